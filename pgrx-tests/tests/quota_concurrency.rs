//! Many real sessions at once against one subject and metric: the sum granted is exactly what
//! the limit allows, usage and audit agree with what the clients saw, all-or-nothing holds.

use quota_ext_itests::{audit_rows, in_parallel, one_i64, TestDb};
use rand::Rng;

const SESSIONS: usize = 8;

#[derive(Default)]
struct Outcome {
    granted_calls: i64,
    granted_amount: i64,
    denied_calls: i64,
    errors: Vec<String>,
}

fn hammer(db: &TestDb, calls: usize, amount: impl Fn() -> i64 + Send + Sync + Copy + 'static) -> Outcome {
    let handles = in_parallel(&db, SESSIONS, move |_, c, start| {
        let stmt = c
            .prepare("SELECT allowed FROM quota.consume('hot', 'api', $1)")
            .unwrap();
        let mut out = Outcome::default();
        start();
        for _ in 0..calls {
            let a = amount();
            match c.query_one(&stmt, &[&a]) {
                Ok(row) if row.get::<_, bool>(0) => {
                    out.granted_calls += 1;
                    out.granted_amount += a;
                }
                Ok(_) => out.denied_calls += 1,
                Err(e) => out.errors.push(e.to_string()),
            }
        }
        out
    });
    let mut total = Outcome::default();
    for o in handles {
        total.granted_calls += o.granted_calls;
        total.granted_amount += o.granted_amount;
        total.denied_calls += o.denied_calls;
        total.errors.extend(o.errors);
    }
    total
}

#[track_caller]
fn assert_no_errors(out: &Outcome) {
    assert!(
        out.errors.is_empty(),
        "errors other than denials: {:?}",
        &out.errors[..out.errors.len().min(5)]
    );
}

#[test]
fn eight_sessions_never_over_grant() {
    let db = TestDb::new("one_period");
    let mut c = db.connect();
    // A `total` limit: its window never ends, so a run that crosses midnight still has one
    // usage row to check the sum on (a `day` limit then has two windows, each with its own 500).
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'total', 500)")
        .unwrap();

    // Demand 8 x 100 = 800 units against a limit of 500.
    let out = hammer(&db, 100, || 1);

    assert_no_errors(&out);
    assert_eq!(out.granted_calls, 500, "granted exactly the limit");
    assert_eq!(out.denied_calls, 300);
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT used FROM quota.usage_totals WHERE subject = 'hot'"
        ),
        500
    );
    assert_eq!(audit_rows(&mut c, "action = 'consume' AND success"), 500);
    assert_eq!(audit_rows(&mut c, "action = 'consume' AND NOT success"), 300);
}

#[test]
fn mixed_amounts_over_two_periods_stay_all_or_nothing() {
    let db = TestDb::new("two_periods");
    let mut c = db.connect();
    // The hour binds first: every denial by the hour must also leave the day untouched.
    c.batch_execute(
        "SELECT quota.set_limit('free', 'api', 'hour', 600);
         SELECT quota.set_limit('free', 'api', 'day', 1000);",
    )
    .unwrap();

    let out = hammer(&db, 60, || rand::thread_rng().gen_range(1..=7));

    assert_no_errors(&out);
    let hour = one_i64(
        &mut c,
        "SELECT used FROM quota.usage_totals WHERE subject = 'hot' AND period = 'hour'",
    );
    let day = one_i64(
        &mut c,
        "SELECT used FROM quota.usage_totals WHERE subject = 'hot' AND period = 'day'",
    );
    assert_eq!(hour, day, "both windows moved together");
    assert_eq!(
        hour, out.granted_amount,
        "usage equals what the clients were granted"
    );
    assert!(hour <= 600, "never above the hour limit: {hour}");
    assert!(out.denied_calls > 0, "demand exceeded the limit");
    let audited = one_i64(
        &mut c,
        "SELECT coalesce(sum(amount), 0)::bigint FROM quota.audit_log WHERE action = 'consume' AND success",
    );
    assert_eq!(audited, out.granted_amount, "audit rows match the grants");
    assert_eq!(
        audit_rows(&mut c, "action = 'consume'"),
        out.granted_calls + out.denied_calls,
        "one audit row per decision"
    );
}

#[test]
fn concurrent_replays_of_one_key_grant_once() {
    let db = TestDb::new("idem_race");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 100)")
        .unwrap();
    let handles = in_parallel(&db, SESSIONS, move |_, c, start| {
        start();
        let row = c
            .query_one(
                "SELECT allowed, replayed, used FROM quota.consume('hot', 'api', 5, 'order-42')",
                &[],
            )
            .unwrap();
        (row.get::<_, bool>(0), row.get::<_, bool>(1), row.get::<_, i64>(2))
    });
    let results: Vec<_> = handles.into_iter().collect();
    assert_eq!(
        results.iter().filter(|r| !r.1).count(),
        1,
        "exactly one first decision: {results:?}"
    );
    assert!(
        results.iter().all(|r| r.0 && r.2 == 5),
        "every replay returns the first decision: {results:?}"
    );
    assert_eq!(one_i64(&mut c, "SELECT used FROM quota.usage_totals"), 5);
    assert_eq!(audit_rows(&mut c, "action = 'consume'"), 1);
}
