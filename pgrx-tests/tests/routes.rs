//! Per-route rate limits (quota.rate_routes), with the seeds' numbers, driven the way PostgREST
//! drives the pre-request hook: its transaction, role and request.* settings, then
//! quota.pre_request().

use postgres::Client;
use quota_ext_itests::{one_i64, TestDb};

/// One PostgREST request through the hook: Ok(the RateLimit-Policy header) or Err(SQLSTATE).
fn request(
    c: &mut Client,
    method: &str,
    path: &str,
    sub: Option<&str>,
    addr: &str,
) -> Result<String, String> {
    let (role, claims) = match sub {
        Some(s) => (
            "authenticated",
            format!(r#"{{"sub":"{s}","role":"authenticated"}}"#),
        ),
        None => ("anon", r#"{"role":"anon"}"#.to_string()),
    };
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL ROLE {role};
         SELECT set_config('request.method', '{method}', true),
                set_config('request.path', '{path}', true),
                set_config('request.headers', '{{\"x-forwarded-for\": \"{addr}\"}}', true),
                set_config('request.jwt.claims', '{claims}', true);"
    ))
    .unwrap();
    let out = match tx.batch_execute("SELECT quota.pre_request()") {
        Ok(()) => {
            let h: String = tx
                .query_one("SELECT current_setting('response.headers', true)", &[])
                .unwrap()
                .get(0);
            let v: serde_json::Value = serde_json::from_str(&h).unwrap();
            let policy = v
                .as_array()
                .unwrap()
                .iter()
                .find_map(|o| {
                    o.get("RateLimit-Policy")
                        .and_then(|p| p.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            Ok(policy)
        }
        Err(e) => Err(e.code().map(|s| s.code().to_string()).unwrap_or_default()),
    };
    drop(tx);
    out
}

/// Tokens left in a bucket, peeked by a trusted caller (cost 0).
fn left(c: &mut Client, policy: &str, key: &str) -> i64 {
    one_i64(
        c,
        &format!("SELECT remaining FROM quota.rate_limit('{policy}', '{key}', 0)"),
    )
}

fn seeds(c: &mut Client) {
    c.batch_execute(
        "INSERT INTO quota.rate_policies (policy, plan, rate, per) VALUES
             ('events_read', 'free', 100, '1 minute'),
             ('events_write', 'free', 30, '1 minute'),
             ('batches_write', 'free', 20, '1 minute'),
             ('per_ip', 'free', 100, '1 minute'),
             ('per_ip', 'anonymous', 100, '1 minute');
         INSERT INTO quota.rate_routes (method, path_pattern, policy, key_by, priority) VALUES
             ('GET', '/events%', 'events_read', 'user', 10),
             ('POST', '/events%', 'events_write', 'user', 10),
             ('POST', '/rpc/consume\\_batch\\_quantity', 'batches_write', 'user', 10),
             ('*', '%', 'per_ip', 'ip', 1000);",
    )
    .unwrap();
}

#[test]
fn the_seeds_routes_apply_all_or_nothing() {
    let db = TestDb::new("routes_seeds");
    let mut c = db.connect();
    seeds(&mut c);
    // Events POST: 30 a minute for the user; the per-IP bucket counts them too.
    for n in 0..30 {
        assert_eq!(
            request(&mut c, "POST", "/events", Some("alice"), "203.0.113.7").as_deref(),
            Ok("\"events_write\";q=30;w=60"),
            "POST {n}: the first route by priority is the one reported"
        );
    }
    assert_eq!(
        request(&mut c, "POST", "/events", Some("alice"), "203.0.113.7"),
        Err("PGRST".into()),
        "the 31st POST is denied"
    );
    // The first route by priority denied: the per-IP bucket was not touched.
    assert_eq!(left(&mut c, "per_ip", "ip:203.0.113.7"), 70);
    // Events GET: 100 for the user, but the address has 70 left, even for signed-in users.
    let mut allowed = 0;
    while request(&mut c, "GET", "/events/12", Some("alice"), "203.0.113.7").is_ok() {
        allowed += 1;
        assert!(allowed <= 100);
    }
    assert_eq!(allowed, 70, "the per-IP limit binds");
    assert_eq!(
        left(&mut c, "events_read", "alice"),
        30,
        "the denied GET spent no events_read token"
    );
    assert_eq!(
        request(&mut c, "GET", "/events", Some("bob"), "203.0.113.7"),
        Err("PGRST".into()),
        "another user behind the same address is limited with it (seed 004)"
    );
    // Another address, another user: batches POST 20 a minute, LIKE's escaped underscores.
    for _ in 0..20 {
        request(
            &mut c,
            "POST",
            "/rpc/consume_batch_quantity",
            Some("carol"),
            "198.51.100.1",
        )
        .unwrap();
    }
    assert_eq!(
        request(
            &mut c,
            "POST",
            "/rpc/consume_batch_quantity",
            Some("carol"),
            "198.51.100.1"
        ),
        Err("PGRST".into())
    );
    assert!(
        request(
            &mut c,
            "POST",
            "/rpc/consumeXbatch_quantity",
            Some("carol"),
            "198.51.100.1"
        )
        .is_ok(),
        "an escaped _ matches only itself"
    );
    // Anonymous callers: the per-IP route, keyed by the address.
    assert_eq!(
        request(&mut c, "GET", "/items", None, "192.0.2.9").as_deref(),
        Ok("\"per_ip\";q=100;w=60")
    );
}

#[test]
fn without_a_matching_route_the_method_rule_applies_and_routes_change_at_commit() {
    let db = TestDb::new("routes_fallback");
    let mut c = db.connect();
    c.batch_execute(
        "INSERT INTO quota.rate_policies (policy, plan, rate, per) VALUES
             ('write', 'free', 5, '1 minute'), ('events_write', 'free', 2, '1 minute');
         INSERT INTO quota.rate_routes (method, path_pattern, policy) VALUES ('POST', '/events%', 'events_write');",
    )
    .unwrap();
    assert_eq!(
        request(&mut c, "POST", "/other", Some("dan"), "203.0.113.8").as_deref(),
        Ok("\"write\";q=5;w=60"),
        "no route matches: the method rule"
    );
    assert_eq!(
        request(&mut c, "POST", "/events", Some("dan"), "203.0.113.8").as_deref(),
        Ok("\"events_write\";q=2;w=60")
    );
    // A route whose policy does not exist limits nothing of its own: the method rule.
    c.batch_execute(
        "INSERT INTO quota.rate_routes (method, path_pattern, policy) VALUES ('GET', '/x%', 'nope')",
    )
    .unwrap();
    assert!(request(&mut c, "GET", "/x", Some("dan"), "203.0.113.8").is_ok());
    // Routes are cached per backend and follow committed changes.
    c.batch_execute("DELETE FROM quota.rate_routes WHERE policy = 'events_write'")
        .unwrap();
    assert_eq!(
        request(&mut c, "POST", "/events", Some("dan"), "203.0.113.8").as_deref(),
        Ok("\"write\";q=5;w=60")
    );
    // Bad rows are refused by the table.
    for sql in [
        "INSERT INTO quota.rate_routes (method, path_pattern, policy) VALUES ('get', '/a', 'write')",
        "INSERT INTO quota.rate_routes (method, path_pattern, policy) VALUES ('GET', '', 'write')",
        "INSERT INTO quota.rate_routes (method, path_pattern, policy, key_by) VALUES ('GET', '/a', 'write', 'session')",
    ] {
        let e = c.batch_execute(sql).unwrap_err();
        assert_eq!(e.code().map(|s| s.code()), Some("23514"), "{sql}");
    }
    // Trusted callers pass unlimited.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        "SELECT set_config('request.method', 'POST', true), set_config('request.path', '/events', true);
         SELECT quota.pre_request();",
    )
    .unwrap();
}
