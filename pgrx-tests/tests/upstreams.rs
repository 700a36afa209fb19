//! Upstream API budgets in shared memory: learned from the upstream's answers, spent exactly
//! by real concurrent sessions, observations arriving while others spend, bad input.

use quota_ext_itests::{as_role_with_claims, in_parallel, one_bool, sqlstate, TestDb};
use std::time::Duration;

/// (allowed, remaining) of a call.
fn call(c: &mut postgres::Client, sql: &str) -> (bool, Option<i64>) {
    let r = c
        .query_one(&format!("SELECT allowed, remaining FROM {sql}"), &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (r.get(0), r.get(1))
}

#[test]
fn eight_sessions_spend_one_budget_exactly_down_to_its_reserve() {
    let db = TestDb::new("upstream_exact");
    let mut c = db.connect();
    c.batch_execute(
        "INSERT INTO quota.upstreams (api, reserve) VALUES ('github', 10);
         SELECT quota.upstream_observe('github', 5000, 100, now() + interval '1 hour');",
    )
    .unwrap();
    let allowed: usize = in_parallel(&db, 8, |_, c, start| {
        let stmt = c
            .prepare("SELECT allowed FROM quota.upstream_acquire('github')")
            .unwrap();
        start();
        (0..20)
            .filter(|_| c.query_one(&stmt, &[]).unwrap().get::<_, bool>(0))
            .count()
    })
    .into_iter()
    .sum();
    assert_eq!(allowed, 90, "100 remaining, 10 kept in reserve");
    let r = c
        .query_one(
            "SELECT allowed, remaining, retry_after_seconds FROM quota.upstream_acquire('github')",
            &[],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, bool>(0), r.get::<_, Option<i64>>(1)),
        (false, Some(10))
    );
    let retry: f64 = r.get(2);
    assert!(
        retry > 3500.0 && retry <= 3600.0,
        "denied until reset_at: {retry}"
    );
    // A cost larger than what is left above the reserve is denied and spends nothing.
    c.batch_execute("UPDATE quota.upstreams SET reserve = 0 WHERE api = 'github'")
        .unwrap();
    assert_eq!(
        call(&mut c, "quota.upstream_acquire('github', 11)"),
        (false, Some(10))
    );
    assert_eq!(
        call(&mut c, "quota.upstream_acquire('github', 10)"),
        (true, Some(0))
    );
}

#[test]
fn observations_arriving_while_others_spend_never_give_more_than_the_upstream_said() {
    let db = TestDb::new("upstream_observe");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.upstream_observe('models', 1000, 300, '2126-01-01 00:00:00+00')")
        .unwrap();
    // Six sessions spend; two keep reporting what the upstream says, falling from 300 to 150 in
    // the same window, each followed by a stale answer of 400 for an earlier window: the budget
    // is never above the least said.
    let out = in_parallel(&db, 8, |i, c, start| {
        start();
        let mut allowed = 0;
        if i < 6 {
            for _ in 0..80 {
                if c.query_one("SELECT allowed FROM quota.upstream_acquire('models')", &[])
                    .unwrap()
                    .get::<_, bool>(0)
                {
                    allowed += 1;
                }
            }
        } else {
            for left in (150..=300).rev().step_by(10) {
                c.batch_execute(&format!(
                    "SELECT quota.upstream_observe('models', 1000, {left}, '2126-01-01 00:00:00+00');
                     SELECT quota.upstream_observe('models', 1000, 400, now() - interval '1 hour');"
                ))
                .unwrap();
            }
        }
        allowed
    });
    let allowed: i64 = out.iter().sum();
    let (_, remaining) = call(&mut c, "quota.upstream_acquire('models', 0)");
    let remaining = remaining.unwrap();
    assert!(
        allowed <= 300,
        "never more than the first observation allowed: {allowed}"
    );
    assert!(
        remaining <= 150,
        "the least observation of the window holds: {remaining}"
    );
    assert!(remaining >= 0);
    // A later window replaces the budget.
    c.batch_execute("SELECT quota.upstream_observe('models', 1000, 1000, '2127-01-01 00:00:00+00')")
        .unwrap();
    assert_eq!(
        call(&mut c, "quota.upstream_acquire('models')"),
        (true, Some(999))
    );
}

#[test]
fn a_window_that_passed_refills_and_unknown_apis_are_not_limited() {
    let db = TestDb::new("upstream_reset");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.upstream_observe('short', 3, 1, now() + interval '1 second')")
        .unwrap();
    assert_eq!(call(&mut c, "quota.upstream_acquire('short')"), (true, Some(0)));
    assert!(!call(&mut c, "quota.upstream_acquire('short')").0);
    std::thread::sleep(Duration::from_millis(1200));
    // The upstream refilled at reset_at: its limit is spendable until the next observation.
    assert_eq!(call(&mut c, "quota.upstream_acquire('short')"), (true, Some(2)));
    assert_eq!(
        call(&mut c, "quota.upstream_acquire('short', 2)"),
        (true, Some(0))
    );
    assert!(!call(&mut c, "quota.upstream_acquire('short')").0);
    // Nothing observed: nothing known to limit by.
    assert_eq!(call(&mut c, "quota.upstream_acquire('never-seen')"), (true, None));
}

#[test]
fn bad_input_and_who_may_call() {
    let db = TestDb::new("upstream_refusals");
    let mut c = db.connect();
    for (sql, expected) in [
        ("SELECT quota.upstream_acquire(NULL)", "22004"),
        ("SELECT quota.upstream_acquire(' ')", "22023"),
        ("SELECT quota.upstream_acquire(repeat('a', 300))", "22001"),
        ("SELECT quota.upstream_acquire('a', NULL)", "22004"),
        ("SELECT quota.upstream_acquire('a', -1)", "22023"),
        ("SELECT quota.upstream_observe('a', NULL, 1, now())", "22004"),
        ("SELECT quota.upstream_observe('a', 10, NULL, now())", "22004"),
        ("SELECT quota.upstream_observe('a', 10, 1, NULL)", "22004"),
        ("SELECT quota.upstream_observe('a', -1, 0, now())", "22023"),
        ("SELECT quota.upstream_observe('a', 10, -1, now())", "22023"),
        ("SELECT quota.upstream_observe('a', 10, 11, now())", "22023"),
        ("SELECT quota.upstream_observe('a', 10, 1, 'infinity')", "22023"),
        (
            "INSERT INTO quota.upstreams (api, reserve) VALUES ('a', -1)",
            "23514",
        ),
    ] {
        assert_eq!(sqlstate(&mut c, sql).as_deref(), Some(expected), "{sql}");
    }
    assert!(
        one_bool(&mut c, "SELECT (quota.upstream_acquire('a')).allowed"),
        "the refusals recorded nothing"
    );
    for role in ["anon", "authenticated"] {
        as_role_with_claims(&mut c, role, r#"{"sub": "u1"}"#);
        assert_eq!(
            sqlstate(&mut c, "SELECT quota.upstream_acquire('a')").as_deref(),
            Some("42501"),
            "{role}"
        );
        c.batch_execute("RESET ROLE").unwrap();
    }
    as_role_with_claims(&mut c, "service_role", "{}");
    assert!(one_bool(
        &mut c,
        "SELECT (quota.upstream_observe('a', 10, 5, now() + interval '1 hour')).allowed"
    ));
    c.batch_execute("RESET ROLE").unwrap();
}
