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

/// `status` and `near_limit` read the same numbers on the primary and on the standby, also for
/// a hot window, whose grants sit in quota.usage_stripes (the count in the primary's shared
/// memory never reaches a standby, and nothing reads it there).
#[test]
fn status_and_near_limit_read_the_same_on_the_standby_for_a_hot_window() {
    let primary_port = quota_ext_itests::env_port("QUOTA_EXT_TEST_PORT");
    let mut primary = connect_on(primary_port, "standby_check");
    let mut standby = connect_on(
        quota_ext_itests::env_port("QUOTA_EXT_STANDBY_PORT"),
        "standby_check",
    );
    // Each its own transaction: room a reset or a refund frees on a hot window counts from its
    // commit.
    for sql in [
        "SET quota_ext.hot_after = 1",
        "SELECT quota.reset_usage('hot-standby')",
        "SELECT quota.consume('hot-standby', 'api')",
        "SELECT quota.consume('hot-standby', 'api')",
        "SELECT quota.consume('hot-standby', 'api')",
        "SELECT quota.consume('hot-standby', 'api')",
        "SELECT quota.refund('hot-standby', 'api', 1)",
    ] {
        primary.batch_execute(sql).unwrap();
    }
    let striped = one_bool(
        &mut primary,
        "SELECT EXISTS (SELECT FROM quota.usage_stripes WHERE subject = 'hot-standby')",
    );
    assert!(striped, "the window is hot on the primary");
    let reading = "SELECT coalesce((SELECT string_agg(format('%s/%s/%s', period, used, remaining), ',')
                                      FROM quota.status('hot-standby')), '')
                   || ' ' || coalesce((SELECT string_agg(format('%s/%s', used, ratio), ',')
                                         FROM quota.near_limit(0.5) WHERE subject = 'hot-standby'), '')";
    let on_primary = quota_ext_itests::one_text(&mut primary, reading);
    assert_eq!(on_primary, "day/3/2 3/0.6");
    let on_standby = poll(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || quota_ext_itests::one_text(&mut standby, reading),
        |r| *r == on_primary,
    );
    assert_eq!(on_standby, on_primary);
}
