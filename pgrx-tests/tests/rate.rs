//! Rate limits in shared memory, seen from many sessions: exactly `burst` calls pass on one
//! bucket whatever the concurrency, and a full table evicts refilled buckets first, then obeys
//! quota_ext.rate_when_full.

use postgres::{Client, NoTls};
use quota_ext_itests::{one_i64, TestDb};
use std::sync::{Arc, Barrier};
use std::thread;

#[test]
fn eight_sessions_share_one_bucket_exactly() {
    let db = TestDb::new("rate_hot");
    const SESSIONS: usize = 8;
    let barrier = Arc::new(Barrier::new(SESSIONS));
    let handles: Vec<_> = (0..SESSIONS)
        .map(|_| {
            let mut c = db.connect();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let stmt = c
                    .prepare("SELECT allowed FROM quota.rate_check('itest:hot', 1, '1 hour', 100)")
                    .unwrap();
                barrier.wait();
                (0..50)
                    .filter(|_| c.query_one(&stmt, &[]).unwrap().get::<_, bool>(0))
                    .count()
            })
        })
        .collect();
    let allowed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(allowed, 100, "exactly the burst passes");
}

fn metric(c: &mut Client, name: &str) -> i64 {
    one_i64(
        c,
        &format!("SELECT value FROM quota.metrics() WHERE name = '{name}'"),
    )
}

#[test]
fn a_full_table_evicts_refilled_buckets_then_obeys_rate_when_full() {
    let port = quota_ext_itests::env_port("QUOTA_EXT_TINY_PORT");
    let mut c = Client::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        NoTls,
    )
    .unwrap();
    c.batch_execute("DROP EXTENSION IF EXISTS quota_ext CASCADE; CREATE EXTENSION quota_ext; SELECT quota.reset_metrics()")
        .unwrap();
    let capacity = metric(&mut c, "key_capacity");
    assert_eq!(capacity, 64, "quota_ext.rate_max_keys = 64 on this server");

    // Buckets that stay in debt for an hour cannot be evicted: the table fills, and with
    // rate_when_full = allow (the default) new keys pass unrecorded.
    let allowed = one_i64(
        &mut c,
        "SELECT count(*) FILTER (WHERE allowed) FROM generate_series(1, 2000) i,
                LATERAL quota.rate_check('slow:' || i, 1, '1 hour', 10)",
    );
    assert_eq!(allowed, 2000);
    assert_eq!(metric(&mut c, "keys_in_use"), capacity);
    let full = metric(&mut c, "full_table_events");
    assert_eq!(full, 2000 - capacity);
    assert_eq!(metric(&mut c, "evictions"), 0);
    // A key that made it in keeps its state.
    let stored = one_i64(
        &mut c,
        "SELECT count(*) FROM generate_series(1, 2000) i,
                LATERAL quota.rate_check('slow:' || i, 1, '1 hour', 10, 0) d WHERE d.remaining = 9",
    );
    assert_eq!(stored, capacity);

    // With rate_when_full = deny, new keys are refused, with no retry time.
    c.batch_execute("SET quota_ext.rate_when_full = 'deny'").unwrap();
    let denied = one_i64(
        &mut c,
        "SELECT count(*) FILTER (WHERE NOT allowed AND retry_after_seconds IS NULL)
           FROM generate_series(1, 100) i, LATERAL quota.rate_check('new:' || i, 1, '1 hour')",
    );
    assert_eq!(denied, 100);
    assert_eq!(metric(&mut c, "full_table_events"), full + 100);

    // Empty it, fill it with buckets that refill within a millisecond, and wait: those lose
    // nothing by going, so new keys evict them instead of finding the table full.
    let reset = one_i64(
        &mut c,
        "SELECT count(*) FILTER (WHERE quota.rate_reset('slow:' || i)) FROM generate_series(1, 2000) i",
    );
    assert_eq!(reset, capacity);
    assert_eq!(metric(&mut c, "keys_in_use"), 0);
    c.batch_execute(
        "SELECT quota.rate_check('fast:' || i, 1000, '1 second') FROM generate_series(1, 2000) i;
         SELECT pg_sleep(0.05);",
    )
    .unwrap();
    let full_before = metric(&mut c, "full_table_events");
    let evictions_before = metric(&mut c, "evictions");
    // rate_when_full is still 'deny': each partition's refilled bucket makes room for one new key
    // (2 000 keys reach all 64 partitions with overwhelming probability); after that the table
    // holds only buckets in debt and new keys are refused.
    let allowed = one_i64(
        &mut c,
        "SELECT count(*) FILTER (WHERE allowed) FROM generate_series(1, 2000) i,
                LATERAL quota.rate_check('next:' || i, 1, '1 hour', 10)",
    );
    assert_eq!(allowed, capacity, "one new key per evicted bucket");
    assert_eq!(metric(&mut c, "evictions") - evictions_before, capacity);
    assert_eq!(metric(&mut c, "full_table_events") - full_before, 2000 - capacity);
    assert_eq!(metric(&mut c, "keys_in_use"), capacity);
}
