//! `boot` against a real PostgreSQL: run modes, failure semantics, crash
//! safety and concurrency (issue 3).

mod common;

use common::*;

#[tokio::test]
async fn boot_makes_the_example_live_and_equal_to_set_based_sql() {
    let db = TestDb::new().await;
    db.gen_events(20_000);
    let run = db.run(&["boot"]);
    run.expect(0);
    for p in ["band", "dancehall", "event", "userpreferences"] {
        assert_eq!(db.ledger(p).await.unwrap().0, "live", "{p}");
        assert_eq!(db.ledger(p).await.unwrap().1, 20_000, "{p}");
    }
    db.assert_tables_match_expected().await;
    // A second boot has nothing to do.
    let again = db.run(&["boot", "--json"]);
    again.expect(0);
    let json: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(json["projectors"].as_array().unwrap().len(), 0);
}
