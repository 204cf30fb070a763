//! `after`: concurrent boots give the same tables as playing the
//! events in order, and dependencies are honoured in boot.

use crate::harness::*;

#[tokio::test]
async fn concurrent_boots_from_scratch_equal_ordered_play_twenty_times() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(30_000);
    db.expected_projection();
    let c = db.client().await;
    for round in 0..20 {
        c.batch_execute(&format!(
            "TRUNCATE {}; DELETE FROM projectionist.projectors",
            EXAMPLE_TABLES.join(", ")
        ))
        .await
        .unwrap();
        // Small batches and every projector at once: the most interleaving.
        db.run(&["boot", "--jobs", "4", "--batch-size", "300", "-q"])
            .expect(0);
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
            assert_eq!(
                diff, 0,
                "round {round}: table {t} differs from ordered play"
            );
        }
    }
}

#[tokio::test]
async fn a_dependent_never_passes_its_dependency_and_stalls_when_it_breaks() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(20_000);
    // Break band at its 50th BandCreated; userpreferences comes after band.
    let nth: i64 = db
        .count("SELECT id FROM events WHERE name = 'BandCreated' ORDER BY tx, id OFFSET 49 LIMIT 1")
        .await;
    let manifest = std::fs::read_to_string(db.manifest_path()).unwrap();
    db.write_manifest(&manifest.replacen(
        "INSERT INTO band (id, name, created) VALUES (:stream::uuid, :data.name, :time)",
        &format!(
            "INSERT INTO band (id, name, created) VALUES (:stream::uuid, CASE WHEN :position = {nth} THEN NULL ELSE :data.name END, :time)"
        ),
        1,
    ));
    let run = db.run(&["boot", "--batch-size", "200"]);
    run.expect(1);
    let (band_state, band_pos) = db.ledger("band").await.unwrap();
    assert_eq!(band_state, "broken");
    let (prefs_state, prefs_pos) = db.ledger("userpreferences").await.unwrap();
    assert_eq!(prefs_state, "stalled");
    assert!(
        prefs_pos <= band_pos,
        "userpreferences at {prefs_pos} went past band at {band_pos}"
    );
    // Fixed: both finish, tables equal ordered play.
    db.write_manifest(&manifest);
    db.run(&["boot"]).expect(0);
    db.assert_tables_match_expected().await;
}

#[tokio::test]
async fn a_cycle_is_a_manifest_error_naming_both() {
    let db = TestDb::new().await;
    example(&db);
    let manifest = std::fs::read_to_string(db.manifest_path()).unwrap();
    db.write_manifest(&manifest.replacen(
        "[projectors.band]\n",
        "[projectors.band]\nafter = [\"userpreferences\"]\n",
        1,
    ));
    let run = db.run(&["boot"]);
    run.expect(2);
    assert!(run.stderr.contains("cycle"), "{}", run.stderr);
    assert!(
        run.stderr.contains("band") && run.stderr.contains("userpreferences"),
        "{}",
        run.stderr
    );
    assert!(db.ledger("band").await.is_none(), "nothing was written");
}

#[tokio::test]
async fn the_ledger_has_the_columns_of_the_contract() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let columns: Vec<String> = c
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'projectionist' AND table_name = 'projectors'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for needed in [
        "name",
        "mode",
        "state",
        "position",
        "updated_at",
        "error",
        "error_position",
        "error_type",
    ] {
        assert!(
            columns.iter().any(|c| c == needed),
            "projectionist.projectors lacks `{needed}`: {columns:?}"
        );
    }
}
