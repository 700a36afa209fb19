//! rate_limit() by policy and plan, and pre_request() driven the way PostgREST drives it.

use postgres::Client;
use quota_ext_itests::{code, metric, one_i64, TestDb};

/// One PostgREST request: its transaction, role and request.* settings, then `sql`.
fn request(
    c: &mut Client,
    role: &str,
    method: &str,
    claims: &str,
    headers: &str,
    sql: &str,
) -> Result<Vec<postgres::Row>, postgres::Error> {
    let mut tx = c.transaction()?;
    tx.batch_execute(&format!(
        "SET LOCAL ROLE {role};
         SELECT set_config('request.method', '{method}', true),
                set_config('request.path', '/items', true),
                set_config('request.headers', '{headers}', true),
                set_config('request.jwt.claims', '{claims}', true);"
    ))?;
    let rows = tx.query(sql, &[])?;
    tx.commit()?;
    Ok(rows)
}

fn limit_of(c: &mut Client, role: &str, claims: &str) -> (String, i64, i64) {
    let rows = request(
        c,
        role,
        "POST",
        claims,
        "{}",
        "SELECT key, rate_limit, remaining FROM quota.rate_limit('default')",
    )
    .unwrap();
    (rows[0].get(0), rows[0].get(1), rows[0].get(2))
}

#[test]
fn policies_apply_per_plan_and_key() {
    let db = TestDb::new("rate_policies");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_plan('u3', 'enterprise')")
        .unwrap();
    assert_eq!(
        limit_of(&mut c, "authenticated", r#"{"sub":"u1"}"#),
        ("u1".into(), 100, 99),
        "default plan: free"
    );
    assert_eq!(
        limit_of(
            &mut c,
            "authenticated",
            r#"{"sub":"u2","app_metadata":{"plan":"pro"}}"#
        ),
        ("u2".into(), 1000, 999),
        "plan from the JWT claim"
    );
    assert_eq!(
        limit_of(&mut c, "authenticated", r#"{"sub":"u3"}"#),
        ("u3".into(), 10000, 9999),
        "plan from quota.subjects"
    );
    // Anonymous: plan anonymous, keyed by the rightmost x-forwarded-for entry (the one the
    // nearest proxy appended; see adversary.rs).
    let rows = request(
        &mut c,
        "anon",
        "GET",
        "{}",
        r#"{"x-forwarded-for":"203.0.113.7, 10.0.0.1"}"#,
        "SELECT key, rate_limit FROM quota.rate_limit('default')",
    )
    .unwrap();
    assert_eq!(
        (rows[0].get::<_, String>(0), rows[0].get::<_, i64>(1)),
        ("ip:10.0.0.1".into(), 20)
    );
    // Buckets are per (policy, key): u1 went from 99 to 98, not 99 again.
    assert_eq!(limit_of(&mut c, "authenticated", r#"{"sub":"u1"}"#).2, 98);
    // Someone else's key, an unknown policy.
    for (sql, expected) in [
        ("SELECT quota.rate_limit('default', 'u2')", "42501"),
        ("SELECT quota.rate_limit('nope')", "42704"),
    ] {
        let err = request(&mut c, "authenticated", "POST", r#"{"sub":"u1"}"#, "{}", sql).unwrap_err();
        assert_eq!(code(&err), expected);
    }
}

#[test]
fn shadow_policies_allow_and_count_and_changes_apply_at_commit() {
    let db = TestDb::new("rate_shadow");
    let mut c = db.connect();
    c.batch_execute("INSERT INTO quota.rate_policies VALUES ('exports', 'free', 1, '1 hour', NULL, true)")
        .unwrap();
    let shadow_before = metric(&mut c, "shadow_denials");
    let allowed = |c: &mut Client| -> bool {
        request(
            c,
            "authenticated",
            "POST",
            r#"{"sub":"s1"}"#,
            "{}",
            "SELECT allowed FROM quota.rate_limit('exports')",
        )
        .unwrap()[0]
            .get(0)
    };
    assert!(allowed(&mut c));
    assert!(allowed(&mut c), "a shadow policy allows");
    assert!(metric(&mut c, "shadow_denials") > shadow_before);
    // Enforce it: the cached policy is replaced at commit.
    c.batch_execute("UPDATE quota.rate_policies SET shadow = false WHERE policy = 'exports'")
        .unwrap();
    assert!(!allowed(&mut c));
    c.batch_execute("UPDATE quota.rate_policies SET burst = 5 WHERE policy = 'exports'")
        .unwrap();
    assert!(allowed(&mut c), "a larger burst applies at once");
}

#[test]
fn pre_request_sets_headers_and_answers_429() {
    let db = TestDb::new("pre_request");
    let mut c = db.connect();
    c.batch_execute("INSERT INTO quota.rate_policies VALUES ('read', 'anonymous', 2, '1 hour')")
        .unwrap();
    let headers = r#"{"x-forwarded-for":"198.51.100.9"}"#;
    let call = |c: &mut Client, method: &str| {
        request(
            c,
            "anon",
            method,
            "{}",
            headers,
            "SELECT quota.pre_request(), current_setting('response.headers', true)",
        )
    };
    // GET uses policy 'read': 2 per hour.
    let rows = call(&mut c, "GET").unwrap();
    let h: String = rows[0].get(1);
    for expected in [
        r#"{"RateLimit-Policy":"\"read\";q=2;w=3600"}"#,
        r#"{"RateLimit":"\"read\";r=1;t=1800"}"#,
        r#"{"RateLimit-Limit":"2"}"#,
        r#"{"RateLimit-Remaining":"1"}"#,
        r#"{"RateLimit-Reset":"1800"}"#,
        r#"{"X-RateLimit-Limit":"2"}"#,
        r#"{"X-RateLimit-Remaining":"1"}"#,
    ] {
        assert!(h.contains(expected), "{expected} missing from {h}");
    }
    call(&mut c, "HEAD").unwrap();
    let err = call(&mut c, "GET").unwrap_err();
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "PGRST");
    let message = db_err.message();
    assert!(message.contains(r#""message":"Too Many Requests""#), "{message}");
    let detail = db_err.detail().unwrap();
    assert!(detail.contains(r#""status":429"#), "{detail}");
    assert!(detail.contains(r#""Retry-After":"1800""#), "{detail}");
    assert!(detail.contains(r#""X-RateLimit-Remaining":"0""#), "{detail}");
    // POST has no 'write' policy: 'default' applies (anonymous: 20 per minute).
    let h: String = call(&mut c, "POST").unwrap()[0].get(1);
    assert!(h.contains(r#"{"RateLimit-Limit":"20"}"#), "{h}");
    // Trusted roles pass without limits or headers.
    let rows = request(
        &mut c,
        "service_role",
        "GET",
        "{}",
        headers,
        "SELECT quota.pre_request(), current_setting('response.headers', true)",
    )
    .unwrap();
    assert_eq!(rows[0].get::<_, Option<String>>(1).unwrap_or_default(), "");
}

/// A committed change reaches other backends' caches at their next call, also inside a
/// transaction they already have open (where no invalidation message is read: a warm call takes
/// no lock), through the generation counter in shared memory.
#[test]
fn a_committed_change_applies_to_the_next_call_inside_an_open_transaction() {
    let db = TestDb::new("config_generation");
    let (mut a, mut b) = (db.connect(), db.connect());
    b.batch_execute(
        "INSERT INTO quota.rate_policies VALUES ('gen', 'anonymous', 10, '1 minute', NULL, false);
         SELECT quota.set_limit('free', 'api', 'day', 10);",
    )
    .unwrap();
    let mut t = a.transaction().unwrap();
    let rate = |t: &mut postgres::Transaction<'_>, key: &str| -> i64 {
        t.query_one("SELECT rate_limit FROM quota.rate_limit('gen', $1)", &[&key])
            .unwrap()
            .get(0)
    };
    let limit =
        |t: &mut postgres::Transaction<'_>| one_i64(t, "SELECT quota_limit FROM quota.consume('ann', 'api')");
    assert_eq!(rate(&mut t, "k1"), 10);
    assert_eq!(limit(&mut t), 10);
    b.batch_execute(
        "UPDATE quota.rate_policies SET rate = 20 WHERE policy = 'gen';
         SELECT quota.set_limit('free', 'api', 'day', 20);",
    )
    .unwrap();
    assert_eq!(
        rate(&mut t, "k2"),
        20,
        "the policy change applies at the next call"
    );
    assert_eq!(limit(&mut t), 20, "the limit change applies at the next call");
    // A change that rolls back moves nothing.
    let mut u = b.transaction().unwrap();
    u.batch_execute("UPDATE quota.rate_policies SET rate = 30 WHERE policy = 'gen'")
        .unwrap();
    u.rollback().unwrap();
    assert_eq!(rate(&mut t, "k3"), 20);
    t.commit().unwrap();
}

/// The request settings are read through a per-backend memory of where they sit in
/// PostgreSQL's (sorted) array of settings. A fresh session first reads them absent; the
/// memory must then notice each one appearing, and settings added before and after them (which
/// shift them in the array) must not make it read a wrong or stale value.
#[test]
fn request_settings_are_read_right_as_settings_come_and_go() {
    let db = TestDb::new("rate_settings");
    let mut c = db.connect();
    let key = |c: &mut Client, sql: &str| -> String {
        c.batch_execute(sql).unwrap();
        let row = c
            .query_one("SELECT key FROM quota.rate_limit('default')", &[])
            .unwrap();
        row.get(0)
    };
    c.batch_execute("SET ROLE anon").unwrap();
    assert_eq!(
        key(&mut c, "SELECT 1"),
        "ip:unknown",
        "no request settings at all"
    );
    assert_eq!(
        key(
            &mut c,
            r#"SET request.headers = '{"x-forwarded-for": "198.51.100.1"}'"#
        ),
        "ip:198.51.100.1"
    );
    for (i, name) in [
        "aaa_qe.first",
        "request.a",
        "request.headers_b",
        "request.jwt.claim.a",
        "request.jwt.claimz",
        "\"Request.JWT.B\"",
        "zzz_qe.last",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            key(&mut c, &format!("SET {name} = 'x{i}'")),
            "ip:198.51.100.1",
            "after {name} appeared"
        );
    }
    assert_eq!(
        key(
            &mut c,
            r#"SET request.headers = '{"x-forwarded-for": "198.51.100.2"}'"#
        ),
        "ip:198.51.100.2",
        "a new value of the same setting"
    );
    c.batch_execute("RESET ROLE; SET ROLE authenticated").unwrap();
    assert_eq!(
        key(&mut c, r#"SET request.jwt.claims = '{"sub": "u-claims"}'"#),
        "u-claims",
        "claims appeared"
    );
    // (the older claim.sub counts only when set for the transaction, as PostgREST set it)
    assert_eq!(
        key(
            &mut c,
            "BEGIN; SET request.jwt.claims = ''; SET LOCAL request.jwt.claim.sub = 'u-legacy'"
        ),
        "u-legacy",
        "the older claim.sub appeared"
    );
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(
        key(&mut c, r#"SET "REQUEST.JWT.CLAIMS" = '{"sub": "u-upper"}'"#),
        "u-upper",
        "names compare without case, as PostgreSQL's"
    );
}
