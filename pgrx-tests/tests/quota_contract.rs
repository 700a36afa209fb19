//! SQLSTATEs, transactions and identity, seen from a client as PostgREST or an app sees them.

use quota_ext_itests::{
    as_session_user, assert_settles, audit_count, audit_rows, one_bool, one_i64, one_text, sqlstate,
    table_counts, untrusted_role_sql, usage_fingerprint, TestDb,
};

#[test]
fn rolled_back_consume_leaves_nothing() {
    let db = TestDb::new("rollback");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 10)")
        .unwrap();
    let before = table_counts(&mut c);

    c.batch_execute("BEGIN; SELECT quota.consume('ann', 'api', 3, 'k1'); ROLLBACK;")
        .unwrap();
    // An error later in the caller's transaction undoes the consume too.
    assert_eq!(
        sqlstate(
            &mut c,
            "BEGIN; SELECT quota.consume('ann', 'api', 3); SELECT 1/0; COMMIT;"
        ),
        Some("22012".into())
    );
    c.batch_execute("ROLLBACK").unwrap();

    assert_eq!(table_counts(&mut c), before);
    // A key whose transaction rolled back is free again: this is not a replay.
    let replayed = one_bool(
        &mut c,
        "SELECT replayed FROM quota.consume('ann', 'api', 3, 'k1')",
    );
    assert!(!replayed);
}

#[test]
fn require_raises_pt429_with_the_decision() {
    let db = TestDb::new("require");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 1); SELECT quota.require('ann', 'api');")
        .unwrap();
    let err = c.batch_execute("SELECT quota.require('ann', 'api')").unwrap_err();
    let db_err = err.as_db_error().expect("server error");
    assert_eq!(db_err.code().code(), "PT429");
    let detail = db_err.detail().expect("decision in DETAIL");
    assert!(
        detail.contains("\"allowed\":false") && detail.contains("\"quota_limit\":1"),
        "{detail}"
    );
    assert!(detail.contains("\"retry_after_seconds\":"), "{detail}");
    // The denial aborted the caller's transaction and changed no usage; its audit row, which
    // the abort would have taken with it, comes from the audit writer.
    assert_eq!(one_i64(&mut c, "SELECT used FROM quota.usage_totals"), 1);
    assert_settles(
        &mut c,
        "SELECT count(*) FROM quota.audit_log
              WHERE subject = 'ann' AND action = 'consume' AND NOT success AND reason = 'limit_reached'
                AND (details->>'used')::bigint = 1",
        1,
    );
    assert_eq!(
        audit_rows(&mut c, "success"),
        2,
        "set_limit and the first require"
    );
    // Caught by the caller (a savepoint), the row still arrives exactly once.
    c.batch_execute(
        "DO $$ BEGIN PERFORM quota.require('ann', 'api'); EXCEPTION WHEN SQLSTATE 'PT429' THEN NULL; END $$",
    )
    .unwrap();
    assert_settles(&mut c, &audit_count("subject = 'ann' AND NOT success"), 2);
}

#[test]
fn bad_input_gets_a_specific_sqlstate_and_changes_nothing() {
    let db = TestDb::new("bad_input");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_limit('free', 'api', 'day', 10);
         SELECT quota.set_limit('free', 'big', 'total', 9223372036854775807);
         SELECT quota.consume('ann', 'api', 4);",
    )
    .unwrap();
    // A counter saturated near the bigint maximum (possible with an 'unlimited' limit).
    c.batch_execute("SELECT quota.consume('ann', 'big', 9223372036854775800)")
        .unwrap();
    let long = "x".repeat(10_000);
    let cases: Vec<(String, &str)> = vec![
        ("SELECT quota.consume(NULL, 'api')".into(), "22004"),
        ("SELECT quota.consume('', 'api')".into(), "22023"),
        ("SELECT quota.consume('   ', 'api')".into(), "22023"),
        ("SELECT quota.consume('ann', NULL)".into(), "22004"),
        ("SELECT quota.consume('ann', '')".into(), "22023"),
        (format!("SELECT quota.consume('{long}', 'api')"), "22001"),
        (format!("SELECT quota.consume('ann', '{long}')"), "22001"),
        (
            format!("SELECT quota.consume('ann', 'api', 1, '{long}')"),
            "22001",
        ),
        ("SELECT quota.consume('ann', 'api', -1)".into(), "22023"),
        ("SELECT quota.consume('ann', 'api', NULL)".into(), "22004"),
        (
            "SELECT quota.consume('ann', 'api', -9223372036854775808)".into(),
            "22023",
        ),
        ("SELECT quota.consume('ann', 'nothing')".into(), "42704"),
        ("SELECT quota.consume('ann', 'big', 100)".into(), "22003"),
        ("SELECT quota.refund('ann', 'api', -1)".into(), "22023"),
        ("SELECT quota.require('ann', 'api', 7)".into(), "PT429"),
        (
            "SELECT quota.set_limit('free', 'api', 'fortnight', 1)".into(),
            "22023",
        ),
        ("SELECT quota.set_limit('free', 'api', NULL, 1)".into(), "22004"),
        (
            "SELECT quota.set_limit('platinum', 'api', 'day', 1)".into(),
            "42704",
        ),
        ("SELECT quota.set_limit('free', 'api', 'day', -5)".into(), "22023"),
        ("SELECT quota.set_plan('ann', 'platinum')".into(), "42704"),
        (
            "SELECT quota.set_plan('ann', 'pro', 'Mars/Olympus')".into(),
            "22023",
        ),
        ("SELECT quota.set_plan(NULL, 'pro')".into(), "22004"),
        (
            "SELECT quota.set_override('ann', 'api', 'eon', 5)".into(),
            "22023",
        ),
        (
            "SELECT quota.set_override('ann', 'api', 'day', -1)".into(),
            "22023",
        ),
        ("SELECT quota.reset_usage(NULL)".into(), "22004"),
        ("SELECT quota.near_limit(-1)".into(), "22023"),
        ("SELECT quota.near_limit('NaN')".into(), "22023"),
        ("SELECT quota.audit_page('ann', NULL, 0)".into(), "22023"),
        ("SELECT quota.audit_page('ann', NULL, 1000000)".into(), "22023"),
        ("SELECT quota.prune('-1 day')".into(), "22023"),
        ("SELECT quota.prune('90 days', '-1 second')".into(), "22023"),
    ];
    for (sql, expected) in cases {
        let counts = table_counts(&mut c);
        let usage = usage_fingerprint(&mut c);
        let got = sqlstate(&mut c, &sql);
        let shown = if sql.len() > 80 {
            format!("{}...", &sql[..80])
        } else {
            sql.clone()
        };
        assert_eq!(got.as_deref(), Some(expected), "{shown}");
        assert_eq!(table_counts(&mut c), counts, "{shown} changed row counts");
        assert_eq!(usage_fingerprint(&mut c), usage, "{shown} changed usage");
    }
}

#[test]
fn untrusted_roles_act_only_as_their_jwt_subject() {
    let db = TestDb::new("identity");
    let mut c = db.connect();
    c.batch_execute(&format!(
        "SELECT quota.set_limit('free', 'api', 'day', 10);
         {}
         GRANT SELECT ON quota.usage TO quota_app_user;",
        untrusted_role_sql("quota_app_user")
    ))
    .unwrap();
    let claims =
        |sub: &str| format!("SELECT set_config('request.jwt.claims', '{{\"sub\":\"{sub}\"}}', false)");
    c.batch_execute("SET ROLE quota_app_user").unwrap();
    let before = as_session_user(&mut c, "quota_app_user", table_counts);

    // No claims: refused.
    assert_eq!(
        sqlstate(&mut c, "SELECT quota.consume(NULL, 'api')").as_deref(),
        Some("42501")
    );
    c.batch_execute(&claims("user-1")).unwrap();
    // Another subject: refused. Admin functions: refused. Tables: not writable.
    for sql in [
        "SELECT quota.consume('user-2', 'api')",
        "SELECT quota.status('user-2')",
        "SELECT quota.set_limit('free', 'api', 'day', 1000)",
        "SET quota_ext.default_plan = 'enterprise'",
        "INSERT INTO quota.usage VALUES ('user-1', 'api', 'day', now(), 0)",
    ] {
        assert_eq!(sqlstate(&mut c, sql).as_deref(), Some("42501"));
    }
    assert_eq!(
        as_session_user(&mut c, "quota_app_user", table_counts),
        before,
        "refusals changed nothing"
    );

    // Its own subject, by name or as NULL ("me"), works.
    assert_eq!(one_i64(&mut c, "SELECT used FROM quota.consume(NULL, 'api')"), 1);
    assert_eq!(
        one_i64(&mut c, "SELECT used FROM quota.consume('user-1', 'api')"),
        2
    );
    // The older request.jwt.claim.sub setting is accepted too, set for the transaction as
    // PostgREST set it (a session-level one could be a previous client's, see adversary.rs).
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        "SELECT set_config('request.jwt.claims', '', true); SELECT set_config('request.jwt.claim.sub', 'user-3', true)",
    )
    .unwrap();
    let subject = one_text(&mut tx, "SELECT subject FROM quota.consume(NULL, 'api')");
    tx.commit().unwrap();
    assert_eq!(subject, "user-3");
    // Row level security: only its own usage rows are visible.
    c.batch_execute(&claims("user-3")).unwrap();
    assert_eq!(one_i64(&mut c, "SELECT count(*) FROM quota.usage"), 1);
    // Malformed claims are reported, not guessed at.
    c.batch_execute("SELECT set_config('request.jwt.claims', '{not json', false)")
        .unwrap();
    assert_eq!(
        sqlstate(&mut c, "SELECT quota.consume(NULL, 'api')").as_deref(),
        Some("22P02")
    );

    // A role named in quota_ext.trusted_roles may act for anyone (roles that do not exist are
    // ignored).
    c.batch_execute(
        "RESET ROLE; SET quota_ext.trusted_roles = 'no_such_role, quota_app_user'; SET ROLE quota_app_user",
    )
    .unwrap();
    assert_eq!(
        one_i64(&mut c, "SELECT used FROM quota.consume('user-9', 'api')"),
        1
    );
    c.batch_execute("RESET ROLE").unwrap();
}

#[test]
fn limit_changes_reach_other_sessions_at_commit() {
    let db = TestDb::new("cache_inval");
    let mut a = db.connect();
    let mut b = db.connect();
    a.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 10)")
        .unwrap();
    let limit =
        |c: &mut postgres::Client| one_i64(c, "SELECT quota_limit FROM quota.consume('ann', 'api', 0)");
    assert_eq!(limit(&mut a), 10, "session a has cached the limit");

    // Uncommitted, then rolled back: a keeps seeing 10.
    b.batch_execute("BEGIN; SELECT quota.set_limit('free', 'api', 'day', 1);")
        .unwrap();
    assert_eq!(limit(&mut b), 1, "the writing transaction sees its own change");
    assert_eq!(limit(&mut a), 10);
    b.batch_execute("ROLLBACK").unwrap();
    assert_eq!(limit(&mut a), 10);
    assert_eq!(
        limit(&mut b),
        10,
        "the rolled back change is gone from b's cache too"
    );

    // Committed through the admin function, then by plain DML on each source table.
    b.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 2)")
        .unwrap();
    assert_eq!(limit(&mut a), 2);
    b.batch_execute("UPDATE quota.limits SET max_amount = 3").unwrap();
    assert_eq!(limit(&mut a), 3);
    b.batch_execute("INSERT INTO quota.overrides VALUES ('ann', 'api', 'day', 4)")
        .unwrap();
    assert_eq!(limit(&mut a), 4);
    b.batch_execute("INSERT INTO quota.plans VALUES ('gold'); INSERT INTO quota.limits VALUES ('gold', 'api', 'day', 5);
                     DELETE FROM quota.overrides; INSERT INTO quota.subjects (subject, plan) VALUES ('ann', 'gold')")
        .unwrap();
    assert_eq!(limit(&mut a), 5);
    b.batch_execute("UPDATE quota.plans SET plan = 'platinum' WHERE plan = 'gold'; UPDATE quota.limits SET max_amount = 6 WHERE plan = 'platinum'")
        .unwrap();
    assert_eq!(limit(&mut a), 6);
    // A session's default plan is a setting: a change applies to it at once.
    b.batch_execute("DELETE FROM quota.subjects; SELECT quota.set_limit('pro', 'api', 'day', 7)")
        .unwrap();
    a.batch_execute("SET quota_ext.default_plan = 'pro'").unwrap();
    assert_eq!(limit(&mut a), 7);
}
