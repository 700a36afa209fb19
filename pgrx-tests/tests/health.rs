//! quota.health(): every check, its answer when something is wrong, who may call it.

use quota_ext_itests::{as_role_with_claims, env_port, one_bool, one_i64, one_text, sqlstate, TestDb};

fn check(c: &mut postgres::Client, name: &str) -> (bool, String) {
    let r = c
        .query_one(
            "SELECT ok, detail FROM quota.health() WHERE \"check\" = $1",
            &[&name],
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (r.get(0), r.get(1))
}

#[test]
fn every_check_answers_and_an_open_breaker_and_churning_caches_show() {
    let db = TestDb::new("health");
    let mut c = db.connect();
    let names = one_text(&mut c, "SELECT string_agg(\"check\", ',') FROM quota.health()");
    assert_eq!(
        names,
        "preload,rate_table_fill,rate_table_full_events,audit_queue_fill,audit_rows_lost,audit_writers,breakers_open,cache_churn"
    );
    assert!(check(&mut c, "preload").0);
    assert!(check(&mut c, "rate_table_fill")
        .1
        .contains("rate-limit buckets in use"));
    assert!(one_bool(
        &mut c,
        "SELECT bool_and(detail <> '') FROM quota.health()"
    ));
    // An open breaker shows, with what to do.
    c.batch_execute(
        "INSERT INTO quota.breakers (name, failure_threshold) VALUES ('health-check-svc', 1);
         SELECT quota.breaker_record('health-check-svc', false);",
    )
    .unwrap();
    let (ok, detail) = check(&mut c, "breakers_open");
    assert!(!ok && detail.contains("quota.breaker_reset"), "{detail}");
    c.batch_execute("SELECT quota.breaker_reset('health-check-svc')")
        .unwrap();
    // Limits written on every request: the caches churn.
    c.batch_execute("SELECT quota.reset_metrics(); SELECT quota.set_limit('free', 'api', 'day', 1000000)")
        .unwrap();
    for n in 0..600 {
        c.batch_execute(&format!(
            "SELECT quota.set_limit('free', 'api', 'day', {}); SELECT quota.consume('churn', 'api');",
            1_000_000 + n
        ))
        .unwrap();
    }
    let (ok, detail) = check(&mut c, "cache_churn");
    assert!(!ok && detail.contains("request path"), "{detail}");
    assert!(
        one_i64(
            &mut c,
            "SELECT value FROM quota.metrics() WHERE name = 'cache_invalidations'"
        ) >= 600
    );
}

#[test]
fn only_trusted_callers_and_service_role_read_it() {
    let db = TestDb::new("health_roles");
    let mut c = db.connect();
    for role in ["anon", "authenticated"] {
        as_role_with_claims(&mut c, role, r#"{"sub": "u1"}"#);
        assert_eq!(
            sqlstate(&mut c, "SELECT * FROM quota.health()").as_deref(),
            Some("42501"),
            "{role}"
        );
        c.batch_execute("RESET ROLE").unwrap();
    }
    as_role_with_claims(&mut c, "service_role", "{}");
    assert!(one_i64(&mut c, "SELECT count(*) FROM quota.health()") >= 8);
    c.batch_execute("RESET ROLE").unwrap();
}

#[test]
fn without_the_preload_it_says_so() {
    let port = env_port("QUOTA_EXT_NOPRELOAD_PORT");
    let db = TestDb::on(port, "health_nopreload");
    let mut c = db.connect();
    let r = c
        .query("SELECT \"check\", ok, detail FROM quota.health()", &[])
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].get::<_, String>(0), r[0].get::<_, bool>(1)),
        ("preload".into(), false)
    );
    assert!(r[0].get::<_, String>(2).contains("shared_preload_libraries"));
}

#[test]
fn a_server_without_worker_slots_reports_its_writers_cannot_start() {
    // The small server: max_worker_processes = 0.
    let port = env_port("QUOTA_EXT_TINY_PORT");
    let db = TestDb::on(port, "health_tiny");
    let mut c = db.connect();
    let (ok, detail) = check(&mut c, "audit_writers");
    assert!(!ok && detail.contains("max_worker_processes is 0"), "{detail}");
}
