//! The rate path on a hot standby: it writes no table (rate_check runs no SQL, rate_limit only
//! reads policies), so it works on a read-only replica with buckets of the replica's own, while
//! the quota path, which writes, is refused as any write is there.

use postgres::{Client, NoTls};

#[test]
fn rate_limits_work_on_a_hot_standby() {
    let port = quota_ext_itests::env_port("QUOTA_EXT_STANDBY_PORT");
    let mut c = Client::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=standby_check"),
        NoTls,
    )
    .unwrap();
    let in_recovery: bool = c.query_one("SELECT pg_is_in_recovery()", &[]).unwrap().get(0);
    assert!(in_recovery, "this must be a standby");

    let allowed = |c: &mut Client| -> bool {
        c.query_one(
            "SELECT allowed FROM quota.rate_check('standby:k', 2, '1 hour')",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert!(allowed(&mut c));
    assert!(allowed(&mut c));
    assert!(!allowed(&mut c), "the burst of 2 is spent");
    let (key, limit): (String, i64) = {
        let r = c
            .query_one(
                "SELECT key, rate_limit FROM quota.rate_limit('default', 'standby-user')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (key.as_str(), limit),
        ("standby-user", 20),
        "policies are read on the replica"
    );
    let checks: i64 = c
        .query_one(
            "SELECT value FROM quota.metrics() WHERE name = 'rate_checks'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(checks >= 4);

    // A policy changed on the primary reaches this session's policy cache when the replica
    // replays the commit: the cache is invalidated by the invalidation messages the commit
    // record carries, which a standby replays too (a counter in the primary's shared memory
    // would never reach it).
    let primary_port = quota_ext_itests::env_port("QUOTA_EXT_TEST_PORT");
    let mut primary = Client::connect(
        &format!("host=127.0.0.1 port={primary_port} user=postgres dbname=standby_check"),
        NoTls,
    )
    .unwrap();
    primary
        .batch_execute(
            "UPDATE quota.rate_policies SET rate = 21 WHERE policy = 'default' AND plan = 'anonymous'",
        )
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut limit: i64 = 0;
    while std::time::Instant::now() < deadline {
        limit = c
            .query_one(
                "SELECT rate_limit FROM quota.rate_limit('default', 'standby-user')",
                &[],
            )
            .unwrap()
            .get(0);
        if limit == 21 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        limit, 21,
        "the replica's cached policy follows the primary's change"
    );
    primary
        .batch_execute(
            "UPDATE quota.rate_policies SET rate = 20 WHERE policy = 'default' AND plan = 'anonymous'",
        )
        .unwrap();

    let err = c.batch_execute("SELECT quota.consume('ann', 'api')").unwrap_err();
    assert_eq!(
        err.code().map(|s| s.code()),
        Some("25006"),
        "quotas write, and a standby is read-only: {err}"
    );
}
