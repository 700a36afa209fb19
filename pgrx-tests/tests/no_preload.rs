//! A server started without shared_preload_libraries: the shared-memory features refuse with
//! 55000 and a hint, everything else works.

use postgres::{Client, NoTls};

#[test]
fn without_preload_shared_memory_features_refuse_and_the_rest_works() {
    let port = quota_ext_itests::env_port("QUOTA_EXT_NOPRELOAD_PORT");
    let mut c = Client::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        NoTls,
    )
    .unwrap();
    c.batch_execute("DROP EXTENSION IF EXISTS quota_ext CASCADE; CREATE EXTENSION quota_ext")
        .unwrap();
    let preload: String = c.query_one("SHOW shared_preload_libraries", &[]).unwrap().get(0);
    assert!(
        !preload.contains("quota_ext"),
        "this server must not preload quota_ext: {preload}"
    );

    let err = c.batch_execute("SELECT * FROM quota.metrics()").unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "55000");
    assert!(
        db.hint().unwrap_or("").contains("shared_preload_libraries"),
        "{:?}",
        db.hint()
    );

    let err = c.batch_execute("SELECT quota.rate_check('k', 10)").unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "55000");
    assert!(
        db.hint().unwrap_or("").contains("shared_preload_libraries"),
        "{:?}",
        db.hint()
    );

    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 1)")
        .unwrap();
    let allowed: bool = c
        .query_one("SELECT allowed FROM quota.consume('ann', 'api')", &[])
        .unwrap()
        .get(0);
    assert!(allowed);
    let allowed: bool = c
        .query_one("SELECT allowed FROM quota.consume('ann', 'api')", &[])
        .unwrap()
        .get(0);
    assert!(!allowed);
    let left: i64 = c
        .query_one("SELECT remaining FROM quota.consume_item('shop', 'milk', 2) RIGHT JOIN (SELECT quota.create_batch('shop', 'milk', 5)) b ON true", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 3);
}
