//! Hot windows (src/quota/hot.rs): a window many callers charge at once is counted in shared
//! memory and written to per-backend rows. What must hold there as on the cold path: a grant
//! lives and dies with its transaction and its savepoints, a window turning hot under load
//! never over-grants, refunds and resets move the shared count with the rows, a prepared
//! transaction cannot hold a hot grant, and REPEATABLE READ callers are served exactly.
//! (The exactness suites run again on hot windows: scripts/test.sh sets
//! QUOTA_EXT_TEST_HOT_AFTER=1 for quota_concurrency, pooled and random_ops; standby.rs reads a hot
//! window on a standby.)

use postgres::Client;
use quota_ext_itests::{
    audit_rows, code, in_parallel, one_bool, one_i64, one_text, untrusted_role_sql, TestDb,
};

/// Whether the subject's windows were charged on the hot path (they have stripes).
fn striped(c: &mut Client, subject: &str) -> bool {
    one_bool(
        c,
        &format!("SELECT EXISTS (SELECT FROM quota.usage_stripes WHERE subject = '{subject}')"),
    )
}

/// A database whose windows turn hot after `after` consumes of a subject and metric in a
/// second (1: at the first).
fn hot_db(test: &str, after: u32) -> TestDb {
    let db = TestDb::new(test);
    db.connect()
        .batch_execute(&format!(
            "ALTER DATABASE {} SET quota_ext.hot_after = {after}",
            db.name
        ))
        .unwrap();
    db
}

fn used(c: &mut Client, subject: &str) -> i64 {
    one_i64(
        c,
        &format!("SELECT coalesce(sum(used), 0)::bigint FROM quota.usage_totals WHERE subject = '{subject}'"),
    )
}

fn consume(c: &mut Client, subject: &str, amount: i64) -> bool {
    one_bool(
        c,
        &format!("SELECT allowed FROM quota.consume('{subject}', 'api', {amount})"),
    )
}

/// Consume 1 until denied; how many were granted.
fn fill(c: &mut Client, subject: &str) -> i64 {
    let mut n = 0;
    while consume(c, subject, 1) {
        n += 1;
    }
    n
}

#[test]
fn a_hot_grant_lives_and_dies_with_its_transaction_and_savepoints() {
    let db = hot_db("hot_xact", 1);
    let (mut a, mut b) = (db.connect(), db.connect());
    a.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 10)")
        .unwrap();
    // A window turns hot once it has a usage row: the first grant is cold, the second hot.
    assert!(consume(&mut a, "ann", 1));
    assert!(!striped(&mut a, "ann"));
    assert!(consume(&mut a, "ann", 1));
    assert!(striped(&mut a, "ann"), "the grant went to the backend's stripe");

    // A grant in flight counts at once for everyone: b is refused without waiting for a.
    a.batch_execute("BEGIN").unwrap();
    assert!(consume(&mut a, "ann", 7));
    assert!(!consume(&mut b, "ann", 2), "2 + 7 in flight leave 1");
    assert!(consume(&mut b, "ann", 1));
    a.batch_execute("ROLLBACK").unwrap();
    assert_eq!(used(&mut b, "ann"), 3, "the rolled-back 7 are gone");

    // Savepoints: a rolled-back one gives its grant back, a released one keeps it.
    a.batch_execute("BEGIN; SAVEPOINT s1").unwrap();
    assert!(consume(&mut a, "ann", 4));
    a.batch_execute("ROLLBACK TO SAVEPOINT s1").unwrap();
    assert!(consume(&mut a, "ann", 1));
    a.batch_execute("SAVEPOINT s2").unwrap();
    assert!(consume(&mut a, "ann", 1));
    a.batch_execute("RELEASE SAVEPOINT s2; SAVEPOINT s3; SAVEPOINT s4")
        .unwrap();
    assert!(consume(&mut a, "ann", 3));
    a.batch_execute("RELEASE SAVEPOINT s4; ROLLBACK TO SAVEPOINT s3")
        .unwrap();
    // An error inside a savepoint rolls it back too (as a PL/pgSQL exception block does).
    a.batch_execute("SAVEPOINT s5").unwrap();
    assert!(consume(&mut a, "ann", 2));
    assert_eq!(code(&a.batch_execute("SELECT 1 / 0").unwrap_err()), "22012");
    a.batch_execute("ROLLBACK TO SAVEPOINT s5; COMMIT").unwrap();
    assert_eq!(used(&mut b, "ann"), 5, "3 before, 1 + 1 kept");
    let status = one_text(
        &mut b,
        "SELECT used || '/' || remaining FROM quota.status('ann') WHERE period = 'day'",
    );
    assert_eq!(status, "5/5");
    // What the shared count says is what the rows say: exactly 5 more fit.
    assert_eq!(fill(&mut b, "ann"), 5);
    assert_eq!(used(&mut b, "ann"), 10);
    assert_eq!(
        audit_rows(&mut b, "subject = 'ann' AND action = 'consume' AND success"),
        2 + 1 + 2 + 5
    );
}

#[test]
fn prepare_transaction_is_refused_after_a_hot_grant_and_allowed_on_cold_windows() {
    let db = hot_db("hot_prepare", 1);
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 10)")
        .unwrap();
    assert!(consume(&mut c, "ann", 1));
    c.batch_execute("BEGIN").unwrap();
    assert!(consume(&mut c, "ann", 3));
    let e = c.batch_execute("PREPARE TRANSACTION 'hot_grant'").unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert!(format!("{e:?}").contains("hot quota window"), "{e:?}");
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'hot_grant'"
        ),
        0
    );
    assert_eq!(used(&mut c, "ann"), 1, "the refused transaction changed nothing");
    assert_eq!(fill(&mut c, "ann"), 9, "and gave its 3 back");

    // A session that keeps its windows cold prepares as before.
    c.batch_execute("SET quota_ext.hot_after = 0; BEGIN").unwrap();
    assert!(consume(&mut c, "bob", 2));
    c.batch_execute("PREPARE TRANSACTION 'cold_grant'").unwrap();
    c.batch_execute("COMMIT PREPARED 'cold_grant'").unwrap();
    assert_eq!(used(&mut c, "bob"), 2);
}

/// Eight sessions on one subject while its window turns hot (after 20 consumes in a second):
/// the cold grants in flight when it turns, and the ones that queued behind the loader, are all
/// counted; the sum granted is exactly the limit.
#[test]
fn a_window_turning_hot_under_load_grants_exactly_its_limit() {
    for (name, limits, subject) in [
        ("hot_turn", "SELECT quota.set_limit('free', 'api', 'total', 3000)", "solo"),
        (
            "hot_turn_periods",
            "SELECT quota.set_limit('free', 'api', 'hour', 3000); SELECT quota.set_limit('free', 'api', 'day', 3500)",
            "solo",
        ),
    ] {
        let db = hot_db(name, 20);
        let mut c = db.connect();
        c.batch_execute(limits).unwrap();
        let subject = subject.to_string();
        let per_session = in_parallel(&db, 8, move |_, c, start| {
            let stmt = c
                .prepare(&format!("SELECT allowed FROM quota.consume('{subject}', 'api', 1)"))
                .unwrap();
            start();
            let (mut granted, mut errors) = (0i64, Vec::new());
            for _ in 0..500 {
                match c.query_one(&stmt, &[]) {
                    Ok(r) => granted += r.get::<_, bool>(0) as i64,
                    Err(e) => errors.push(format!("{e:?}")),
                }
            }
            (granted, errors)
        });
        let granted: i64 = per_session.iter().map(|s| s.0).sum();
        let errors: Vec<&String> = per_session.iter().flat_map(|s| &s.1).collect();
        assert!(errors.is_empty(), "{name}: {:?}", &errors[..errors.len().min(3)]);
        assert_eq!(granted, 3000, "{name}: exactly the limit");
        assert!(striped(&mut c, "solo"), "{name}: the window turned hot");
        assert_eq!(
            one_text(
                &mut c,
                "SELECT string_agg(period || '=' || used, ' ' ORDER BY period) FROM quota.usage_totals"
            ),
            if name == "hot_turn" { "total=3000" } else { "day=3000 hour=3000" },
            "{name}"
        );
        assert_eq!(
            audit_rows(&mut c, "action = 'consume' AND success"),
            3000,
            "{name}: one audit row per grant"
        );
        assert_eq!(audit_rows(&mut c, "action = 'consume' AND NOT success"), 1000, "{name}");
    }
}

#[test]
fn refunds_and_resets_move_the_shared_count_with_the_rows() {
    let db = hot_db("hot_refund", 1);
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 5)")
        .unwrap();
    assert_eq!(fill(&mut c, "ann"), 5);
    // A trusted refund: from the usage row first, the rest from the stripe.
    let r = one_text(
        &mut c,
        "SELECT used || '/' || remaining FROM quota.refund('ann', 'api', 3)",
    );
    assert_eq!(r, "2/3");
    assert_eq!(used(&mut c, "ann"), 2);
    assert_eq!(
        fill(&mut c, "ann"),
        3,
        "the shared count went down by 3 at commit"
    );
    // A rolled-back refund gives nothing back.
    c.batch_execute("BEGIN; SELECT quota.refund('ann', 'api', 4); ROLLBACK")
        .unwrap();
    assert!(!consume(&mut c, "ann", 1));
    // Never below zero.
    c.batch_execute("SELECT quota.refund('ann', 'api', 100)").unwrap();
    assert_eq!(used(&mut c, "ann"), 0);
    assert_eq!(fill(&mut c, "ann"), 5);
    // An untrusted refund of its own grant, by the grant's key.
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 6)")
        .unwrap();
    c.batch_execute(&untrusted_role_sql("hot_app")).unwrap();
    c.batch_execute(
        "SELECT set_config('request.jwt.claims', '{\"sub\": \"ann\"}', false); SET ROLE hot_app;
         SELECT quota.consume(NULL, 'api', 1, 'k1'); SELECT quota.refund(NULL, 'api', 1, 'k1'); RESET ROLE;",
    )
    .unwrap();
    assert_eq!(used(&mut c, "ann"), 5);
    assert_eq!(fill(&mut c, "ann"), 1);
    // A reset empties the window and its shared count; a rolled-back one changes nothing.
    c.batch_execute("BEGIN; SELECT quota.reset_usage('ann'); ROLLBACK")
        .unwrap();
    assert!(!consume(&mut c, "ann", 1));
    c.batch_execute("SELECT quota.reset_usage('ann')").unwrap();
    assert_eq!(used(&mut c, "ann"), 0);
    assert_eq!(fill(&mut c, "ann"), 6);
    // A TRUNCATE of the usage tables (new files: the hot windows of the old ones are never used
    // again) starts every window anew.
    c.batch_execute("TRUNCATE quota.usage, quota.usage_stripes")
        .unwrap();
    assert_eq!(fill(&mut c, "ann"), 6);
    // near_limit and the usage view count the stripes.
    assert_eq!(
        one_text(
            &mut c,
            "SELECT subject || ' ' || used || ' ' || ratio FROM quota.near_limit(0.9) WHERE subject = 'ann'"
        ),
        "ann 6 1"
    );
}

/// A REPEATABLE READ transaction is served from a hot window exactly; it does not turn a window
/// hot itself (the loader's lock could raise a serialization failure there).
#[test]
fn repeatable_read_callers_are_served_exactly() {
    let db = hot_db("hot_rr", 1);
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 100)")
        .unwrap();
    // (The window's usage row exists first: a window turns hot once it has one.)
    assert!(consume(&mut c, "rr", 1));
    c.batch_execute("SELECT quota.reset_usage('rr'); SELECT quota.set_limit('free', 'api', 'day', 101)")
        .unwrap();
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    assert!(consume(&mut c, "rr", 1));
    c.batch_execute("COMMIT").unwrap();
    assert!(!striped(&mut c, "rr"), "not turned hot at REPEATABLE READ");
    assert!(consume(&mut c, "rr", 1));
    assert!(striped(&mut c, "rr"), "turned hot at READ COMMITTED");
    let granted = in_parallel(&db, 8, |_, c, start| {
        start();
        let mut n = 0;
        for _ in 0..20 {
            c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
            n += consume(c, "rr", 1) as i64;
            c.batch_execute("COMMIT").unwrap();
        }
        n
    });
    assert_eq!(granted.iter().sum::<i64>(), 99);
    assert_eq!(used(&mut c, "rr"), 101);
}

/// A window does not turn hot from a transaction that wrote its rows itself: the loader would
/// count that transaction's uncommitted change (a refund, a cold grant), which a rollback takes
/// back from the rows but not from the slot.
#[test]
fn a_window_does_not_turn_hot_from_a_transaction_that_changed_it() {
    let db = hot_db("hot_own_writes", 1);
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 5)")
        .unwrap();
    for subject in ["refunded", "granted"] {
        assert!(
            consume(&mut c, subject, 1),
            "the first grant creates the row, cold"
        );
        c.batch_execute("BEGIN").unwrap();
        if subject == "refunded" {
            c.batch_execute("SELECT quota.refund('refunded', 'api', 1)")
                .unwrap();
        } else {
            // A cold grant of this transaction (this one consume without turning it hot).
            c.batch_execute("SET LOCAL quota_ext.hot_after = 0").unwrap();
            assert!(consume(&mut c, subject, 1));
            c.batch_execute("SET LOCAL quota_ext.hot_after = 1").unwrap();
        }
        assert!(consume(&mut c, subject, 1));
        assert!(
            !striped(&mut c, subject),
            "{subject}: not turned hot by this transaction"
        );
        c.batch_execute("ROLLBACK").unwrap();
        assert_eq!(used(&mut c, subject), 1, "{subject}");
        assert_eq!(
            fill(&mut c, subject),
            4,
            "{subject}: exactly the rest of the limit"
        );
        assert!(striped(&mut c, subject), "{subject}: turned hot since");
    }
}

/// A TRUNCATE of the usage tables waits for the transactions that charge them (they hold a lock
/// of both from before they compute a hot window's key), so none is counted under the old files
/// and written under the new ones.
#[test]
fn a_truncate_waits_for_hot_grants_in_flight() {
    let db = hot_db("hot_truncate", 1);
    let (mut a, mut b) = (db.connect(), db.connect());
    a.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 5)")
        .unwrap();
    assert!(consume(&mut a, "ann", 1));
    assert!(consume(&mut a, "ann", 1));
    assert!(striped(&mut a, "ann"));
    a.batch_execute("BEGIN").unwrap();
    assert!(consume(&mut a, "ann", 1));
    let e = b
        .batch_execute("SET lock_timeout = '200ms'; TRUNCATE quota.usage, quota.usage_stripes")
        .unwrap_err();
    assert_eq!(code(&e), "55P03", "{e:?}");
    a.batch_execute("COMMIT").unwrap();
    b.batch_execute("TRUNCATE quota.usage, quota.usage_stripes")
        .unwrap();
    assert_eq!(used(&mut a, "ann"), 0);
    assert_eq!(fill(&mut a, "ann"), 5);
}
