//! The rate path on a hot standby: it writes no table (rate_check runs no SQL, rate_limit only
//! reads policies), so it works on a read-only replica with buckets of the replica's own, while
//! the quota path, which writes, is refused as any write is there.

use postgres::Client;
use quota_ext_itests::{connect_on, metric, one_bool, one_i64, poll};
use std::time::Duration;

#[test]
fn rate_limits_work_on_a_hot_standby() {
    let port = quota_ext_itests::env_port("QUOTA_EXT_STANDBY_PORT");
    let mut c = connect_on(port, "standby_check");
    let in_recovery = one_bool(&mut c, "SELECT pg_is_in_recovery()");
    assert!(in_recovery, "this must be a standby");

    let allowed = |c: &mut Client| {
        one_bool(
            c,
            "SELECT allowed FROM quota.rate_check('standby:k', 2, '1 hour')",
        )
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
    assert!(metric(&mut c, "rate_checks") >= 4);
    // Circuit breakers work on the replica too, in its own shared memory.
    let opened: String = c
        .query_one(
            "SELECT (quota.breaker_record('standby-breaker', false)).failures::text || ',' ||
                    (quota.breaker_allow('standby-breaker')).state",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(opened, "1,closed");
    // Upstream budgets too.
    let budget: String = c
        .query_one(
            "SELECT (quota.upstream_observe('standby-api', 10, 2, now() + interval '1 hour')).remaining::text || ',' ||
                    (quota.upstream_acquire('standby-api', 2)).allowed::text || ',' ||
                    (quota.upstream_acquire('standby-api')).allowed::text",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(budget, "2,true,false");

    // A policy changed on the primary reaches this session's policy cache when the replica
    // replays the commit: the cache is invalidated by the invalidation messages the commit
    // record carries, which a standby replays too (a counter in the primary's shared memory
    // would never reach it).
    let primary_port = quota_ext_itests::env_port("QUOTA_EXT_TEST_PORT");
    let mut primary = connect_on(primary_port, "standby_check");
    primary
        .batch_execute(
            "UPDATE quota.rate_policies SET rate = 21 WHERE policy = 'default' AND plan = 'anonymous'",
        )
        .unwrap();
    let limit = poll(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            one_i64(
                &mut c,
                "SELECT rate_limit FROM quota.rate_limit('default', 'standby-user')",
            )
        },
        |limit| *limit == 21,
    );
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
