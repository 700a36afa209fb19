//! Circuit breakers in shared memory: the seed's transitions exactly, a half-open breaker
//! letting exactly its probes through across real concurrent sessions, bad input, who may call,
//! and a full table.

use quota_ext_itests::{
    as_role_with_claims, in_parallel, metric, one_bool, one_text, sqlstate, untrusted_role_sql, TestDb,
};
use std::time::Duration;

/// (allowed, state, failures) of a call.
fn call(c: &mut postgres::Client, sql: &str) -> (bool, String, i32) {
    let r = c
        .query_one(&format!("SELECT allowed, state, failures FROM {sql}"), &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (r.get(0), r.get(1), r.get(2))
}

fn allow(c: &mut postgres::Client, name: &str) -> (bool, String, i32) {
    call(c, &format!("quota.breaker_allow('{name}')"))
}

fn record(c: &mut postgres::Client, name: &str, success: bool) -> (bool, String, i32) {
    call(c, &format!("quota.breaker_record('{name}', {success})"))
}

#[test]
fn the_seeds_transitions_exactly() {
    let db = TestDb::new("breaker_seed");
    let mut c = db.connect();
    c.batch_execute("INSERT INTO quota.breakers (name, open_seconds) VALUES ('payments', 0.5)")
        .unwrap();
    // Closed: four failures are not enough.
    for n in 1..=4 {
        assert_eq!(record(&mut c, "payments", false), (true, "closed".into(), n));
        assert!(allow(&mut c, "payments").0);
    }
    // The fifth opens it: calls are refused, with the time until a probe.
    assert_eq!(record(&mut c, "payments", false).1, "open");
    let r = c
        .query_one(
            "SELECT allowed, state, retry_after_seconds FROM quota.breaker_allow('payments')",
            &[],
        )
        .unwrap();
    let retry: f64 = r.get(2);
    assert_eq!(
        (r.get::<_, bool>(0), r.get::<_, String>(1)),
        (false, "open".into())
    );
    assert!(retry > 0.0 && retry <= 0.5, "{retry}");
    // After open_seconds one probe goes through, the next caller does not.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(allow(&mut c, "payments"), (true, "half_open".into(), 5));
    assert_eq!(allow(&mut c, "payments"), (false, "half_open".into(), 5));
    // The probe succeeded: closed, failures forgotten.
    assert_eq!(record(&mut c, "payments", true), (true, "closed".into(), 0));
    assert!(allow(&mut c, "payments").0);
    // Open again; this time the probe fails: open again at once, for open_seconds more.
    for _ in 0..5 {
        record(&mut c, "payments", false);
    }
    std::thread::sleep(Duration::from_millis(600));
    assert!(allow(&mut c, "payments").0, "the probe");
    assert_eq!(record(&mut c, "payments", false).1, "open");
    assert_eq!(allow(&mut c, "payments").1, "open");
    // A breaker without a row has the seed's rules: 5 failures, then 60 s.
    for _ in 0..5 {
        record(&mut c, "search", false);
    }
    let retry = c
        .query_one(
            "SELECT retry_after_seconds FROM quota.breaker_allow('search')",
            &[],
        )
        .unwrap()
        .get::<_, f64>(0);
    assert!(retry > 59.0 && retry <= 60.0, "{retry}");
    // A trusted reset closes it.
    assert_eq!(
        call(&mut c, "quota.breaker_reset('search')"),
        (true, "closed".into(), 0)
    );
    assert!(allow(&mut c, "search").0);
    // A success of a breaker never seen is nothing to keep.
    assert_eq!(record(&mut c, "never-seen", true), (true, "closed".into(), 0));
}

#[test]
fn a_half_open_breaker_lets_exactly_its_probes_through_eight_sessions_at_once() {
    let db = TestDb::new("breaker_race");
    let mut c = db.connect();
    c.batch_execute(
        "INSERT INTO quota.breakers (name, failure_threshold, open_seconds, half_open_probes) VALUES
             ('one-probe', 1, 0.3, 1), ('three-probes', 1, 0.3, 3)",
    )
    .unwrap();
    for (name, probes) in [("one-probe", 1), ("three-probes", 3)] {
        for round in 0..5 {
            assert_eq!(record(&mut c, name, false).1, "open", "{name} round {round}");
            std::thread::sleep(Duration::from_millis(350));
            let owned = name.to_string();
            let allowed = in_parallel(&db, 8, move |_, c, start| {
                let stmt = c.prepare("SELECT allowed FROM quota.breaker_allow($1)").unwrap();
                start();
                c.query_one(&stmt, &[&owned]).unwrap().get::<_, bool>(0)
            });
            assert_eq!(
                allowed.iter().filter(|a| **a).count(),
                probes,
                "{name} round {round}: {allowed:?}"
            );
        }
    }
}

#[test]
fn bad_input_who_may_call_and_no_transactions() {
    let db = TestDb::new("breaker_refusals");
    let mut c = db.connect();
    for (sql, expected) in [
        ("SELECT quota.breaker_allow(NULL)", "22004"),
        ("SELECT quota.breaker_allow('  ')", "22023"),
        ("SELECT quota.breaker_allow(repeat('x', 300))", "22001"),
        ("SELECT quota.breaker_record('x', NULL)", "22004"),
        ("SELECT quota.breaker_reset('')", "22023"),
        (
            "INSERT INTO quota.breakers (name, failure_threshold) VALUES ('x', 0)",
            "23514",
        ),
        (
            "INSERT INTO quota.breakers (name, open_seconds) VALUES ('x', 0)",
            "23514",
        ),
        (
            "INSERT INTO quota.breakers (name, half_open_probes) VALUES ('x', -1)",
            "23514",
        ),
    ] {
        assert_eq!(sqlstate(&mut c, sql).as_deref(), Some(expected), "{sql}");
    }
    // Not transactional, like a sequence: a failure recorded in a rolled-back transaction stays.
    c.batch_execute("BEGIN; SELECT quota.breaker_record('tx', false); ROLLBACK;")
        .unwrap();
    assert_eq!(allow(&mut c, "tx").2, 1);
    // anon and authenticated are not granted the breakers; service_role is.
    for role in ["anon", "authenticated"] {
        as_role_with_claims(&mut c, role, r#"{"sub": "u1"}"#);
        assert_eq!(
            sqlstate(&mut c, "SELECT quota.breaker_allow('tx')").as_deref(),
            Some("42501"),
            "{role}"
        );
        c.batch_execute("RESET ROLE").unwrap();
    }
    as_role_with_claims(&mut c, "service_role", "{}");
    assert!(allow(&mut c, "tx").0);
    assert_eq!(call(&mut c, "quota.breaker_reset('tx')").2, 0);
    c.batch_execute("RESET ROLE").unwrap();
    // A role granted the functions may use them, but only trusted roles reset.
    c.batch_execute(&untrusted_role_sql("breaker_app")).unwrap();
    as_role_with_claims(&mut c, "breaker_app", r#"{"sub": "worker"}"#);
    assert!(record(&mut c, "tx", false).0);
    assert_eq!(
        sqlstate(&mut c, "SELECT quota.breaker_reset('tx')").as_deref(),
        Some("42501")
    );
    c.batch_execute("RESET ROLE").unwrap();
    assert_eq!(allow(&mut c, "tx").2, 1, "the refused reset changed nothing");
    // Counters.
    let denied = metric(&mut c, "breaker_denied");
    let opened = metric(&mut c, "breaker_opened");
    c.batch_execute("INSERT INTO quota.breakers (name, failure_threshold) VALUES ('count', 1)")
        .unwrap();
    record(&mut c, "count", false);
    assert!(!allow(&mut c, "count").0);
    assert!(metric(&mut c, "breaker_opened") > opened);
    assert!(metric(&mut c, "breaker_denied") > denied);
    assert!(one_bool(
        &mut c,
        "SELECT value >= 1 FROM quota.metrics() WHERE name = 'breakers_open'"
    ));
}

#[test]
fn a_full_table_refuses_new_breakers_with_its_own_sqlstate() {
    // The small server: quota_ext.breaker_max = 4.
    let db = TestDb::on(quota_ext_itests::env_port("QUOTA_EXT_TINY_PORT"), "breaker_full");
    let mut c = db.connect();
    assert_eq!(one_text(&mut c, "SHOW quota_ext.breaker_max"), "4");
    // Other databases of this server may hold breakers already: fill what is left.
    let mut n = 0;
    while sqlstate(&mut c, &format!("SELECT quota.breaker_record('full-{n}', false)")).is_none() {
        n += 1;
        assert!(n <= 4, "more breakers than quota_ext.breaker_max");
    }
    assert_eq!(
        sqlstate(&mut c, "SELECT quota.breaker_allow('one-too-many')").as_deref(),
        Some("53400")
    );
    assert!(metric(&mut c, "breaker_full") >= 1);
    // Breakers already in the table go on working.
    if n > 0 {
        assert!(allow(&mut c, "full-0").0);
    }
    // A success or reset of an unknown breaker needs no slot.
    assert!(record(&mut c, "one-too-many", true).0);
}
