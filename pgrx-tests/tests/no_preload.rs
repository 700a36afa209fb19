//! A server started without shared_preload_libraries: the shared-memory features refuse with
//! 55000 and a hint, everything else works.

use quota_ext_itests::{connect_on, one_bool, one_i64, one_text};

#[test]
fn without_preload_shared_memory_features_refuse_and_the_rest_works() {
    let port = quota_ext_itests::env_port("QUOTA_EXT_NOPRELOAD_PORT");
    let mut c = connect_on(port, "postgres");
    c.batch_execute("DROP EXTENSION IF EXISTS quota_ext CASCADE; CREATE EXTENSION quota_ext")
        .unwrap();
    let preload = one_text(&mut c, "SHOW shared_preload_libraries");
    assert!(
        !preload.contains("quota_ext"),
        "this server must not preload quota_ext: {preload}"
    );

    for sql in [
        "SELECT * FROM quota.metrics()",
        "SELECT quota.rate_check('k', 10)",
    ] {
        let err = c.batch_execute(sql).unwrap_err();
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), "55000");
        assert!(
            db.hint().unwrap_or("").contains("shared_preload_libraries"),
            "{:?}",
            db.hint()
        );
    }

    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 1)")
        .unwrap();
    let allowed = |c: &mut postgres::Client| one_bool(c, "SELECT allowed FROM quota.consume('ann', 'api')");
    assert!(allowed(&mut c));
    assert!(!allowed(&mut c));
    let left = one_i64(
        &mut c,
        "SELECT remaining FROM quota.consume_item('shop', 'milk', 2) RIGHT JOIN (SELECT quota.create_batch('shop', 'milk', 5)) b ON true",
    );
    assert_eq!(left, 3);
}
