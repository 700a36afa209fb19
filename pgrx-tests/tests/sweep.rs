//! Bad-input sweep: every function, each argument in turn replaced by each hostile value of its
//! type while the others stay valid. A call either succeeds (a documented answer, e.g. a denial)
//! or fails with a documented SQLSTATE and changes nothing; never XX000, never a crash.

use postgres::Client;
use quota_ext_itests::{
    as_role_with_claims, as_session_user, one_text, table_counts, untrusted_role_sql, usage_fingerprint,
    TestDb,
};

/// SQLSTATEs the README documents, plus PostgreSQL's own input-syntax errors for the
/// argument's type (a value that is not a uuid, an interval, ...).
const DOCUMENTED: &[&str] = &[
    "22004", "22023", "22001", "22003", "22P02", "42501", "42704", "PT429", "P0002", "23514", "40001",
    "55000", "22007", "22008", "22P05", "42P19", "54000", "23503", "53400",
];

fn bad_values(ty: &str) -> Vec<String> {
    let long = format!("repeat('x', 10000)");
    match ty {
        "text" => vec![
            "NULL".into(),
            "''".into(),
            "'   '".into(),
            long,
            "'nonsense'".into(),
            "E'\\t'".into(),
        ],
        "bigint" => vec![
            "NULL".into(),
            "(-9223372036854775808)::bigint".into(),
            "9223372036854775807::bigint".into(),
            "0::bigint".into(),
            "(-1)::bigint".into(),
        ],
        "integer" => vec![
            "NULL".into(),
            "(-2147483648)".into(),
            "2147483647".into(),
            "0".into(),
        ],
        "float8" => vec![
            "NULL".into(),
            "'NaN'::float8".into(),
            "'Infinity'::float8".into(),
            "'-Infinity'::float8".into(),
            "(-1)::float8".into(),
        ],
        "interval" => vec![
            "NULL".into(),
            "'0 seconds'::interval".into(),
            "'-1 day'::interval".into(),
            "'-1 month'::interval".into(),
            "'1 month -31 days'::interval".into(),
        ],
        "uuid" => vec![
            "NULL".into(),
            "'00000000-0000-0000-0000-000000000000'::uuid".into(),
        ],
        "timestamptz" => vec![
            "NULL".into(),
            "'-infinity'::timestamptz".into(),
            "'infinity'::timestamptz".into(),
        ],
        "jsonb" => vec!["NULL".into(), "'[]'::jsonb".into(), "'\"x\"'::jsonb".into()],
        "boolean" => vec!["NULL".into()],
        other => panic!("no bad values for {other}"),
    }
}

/// (function, [(type, valid value)])
fn functions(batch: &str) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let t = |v: &str| ("text", format!("'{v}'"));
    let b = |v: i64| ("bigint", format!("{v}::bigint"));
    vec![
        ("consume", vec![t("ann"), t("api"), b(1), t("k1")]),
        ("require", vec![t("ann"), t("api"), b(1), t("k2")]),
        ("require_decision", vec![t("ann"), t("api"), b(1), t("k4")]),
        ("refund", vec![t("ann"), t("api"), b(1), t("k3")]),
        ("status", vec![t("ann")]),
        ("set_plan", vec![t("ann"), t("pro"), t("UTC")]),
        ("set_parent", vec![t("ann"), t("org")]),
        ("breaker_allow", vec![t("svc")]),
        ("breaker_record", vec![t("svc"), ("boolean", "false".into())]),
        ("breaker_reset", vec![t("svc")]),
        (
            "upstream_observe",
            vec![
                t("gh"),
                b(5000),
                b(10),
                ("timestamptz", "now() + interval '1 hour'".into()),
            ],
        ),
        ("upstream_acquire", vec![t("gh"), b(1)]),
        ("set_limit", vec![t("free"), t("api"), t("day"), b(100)]),
        ("set_override", vec![t("ann"), t("api"), t("day"), b(100)]),
        ("reset_usage", vec![t("bob"), t("api")]),
        ("near_limit", vec![("float8", "0.5::float8".into())]),
        ("audit_page", vec![t("ann"), b(100), ("integer", "10".into())]),
        (
            "prune",
            vec![
                ("interval", "'90 days'::interval".into()),
                ("interval", "'7 days'::interval".into()),
                ("interval", "'400 days'::interval".into()),
            ],
        ),
        (
            "create_batch",
            vec![
                t("shop"),
                t("milk"),
                b(5),
                ("timestamptz", "now() + interval '1 day'".into()),
                ("jsonb", "'{}'::jsonb".into()),
            ],
        ),
        (
            "consume_batch_quantity",
            vec![("uuid", format!("'{batch}'::uuid")), b(1), b(1)],
        ),
        ("consume_item", vec![t("shop"), t("milk"), b(1), t("fefo")]),
        (
            "rate_check",
            vec![
                t("sweep"),
                b(10),
                ("interval", "'1 second'::interval".into()),
                b(10),
                b(1),
            ],
        ),
        ("rate_limit", vec![t("default"), t("sweep"), b(1)]),
        ("rate_reset", vec![t("sweep")]),
        ("request_rate_decision", vec![t("GET")]),
        (
            "window_bounds",
            vec![t("day"), t("UTC"), ("timestamptz", "now()".into())],
        ),
    ]
}

fn state(c: &mut Client) -> String {
    let batches = one_text(
        c,
        "SELECT coalesce(string_agg(format('%s/%s', quantity, version), ',' ORDER BY id), '') FROM quota.batches",
    );
    format!("{:?} {} {}", table_counts(c), usage_fingerprint(c), batches)
}

static TALLY: std::sync::Mutex<std::collections::BTreeMap<String, usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn sweep(c: &mut Client, batch: &str, context: &str) -> usize {
    let mut calls = 0;
    for (f, args) in functions(batch) {
        for i in 0..args.len() {
            for bad in bad_values(args[i].0) {
                let list: Vec<String> = args
                    .iter()
                    .enumerate()
                    .map(|(j, (_, v))| if i == j { bad.clone() } else { v.clone() })
                    .collect();
                let sql = format!("SELECT * FROM quota.{f}({})", list.join(", "));
                let before = state(c);
                calls += 1;
                match c.batch_execute(&sql) {
                    Ok(()) => *TALLY.lock().unwrap().entry("ok".into()).or_insert(0) += 1,
                    Err(e) => {
                        let code = e
                            .code()
                            .map(|s| s.code().to_string())
                            .unwrap_or_else(|| panic!("{context}: {sql}: no SQLSTATE (crash?): {e}"));
                        assert!(
                            DOCUMENTED.contains(&code.as_str()),
                            "{context}: {sql} gave undocumented {code}: {e}"
                        );
                        *TALLY.lock().unwrap().entry(code.clone()).or_insert(0) += 1;
                        assert_eq!(
                            state(c),
                            before,
                            "{context}: {sql} failed ({code}) but changed something"
                        );
                    }
                }
                // The session (and the server) are still there.
                c.batch_execute("SELECT 1")
                    .unwrap_or_else(|e| panic!("{context}: after {sql}: {e}"));
            }
        }
    }
    calls
}

#[test]
fn every_function_against_hostile_input() {
    let db = TestDb::new("sweep");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_limit('free', 'api', 'day', 100);
         SELECT quota.consume('ann', 'api'); SELECT quota.consume('bob', 'api');
         SELECT quota.set_plan('org', 'pro');
         SELECT quota.create_batch('shop', 'milk', 50);",
    )
    .unwrap();
    let batch = one_text(&mut c, "SELECT id::text FROM quota.batches");

    // As a trusted caller, with roles that do not exist and junk in quota_ext.trusted_roles.
    c.batch_execute(r#"SET quota_ext.trusted_roles = 'no_such_role, "Not A Role", , ,pg_no_role'"#)
        .unwrap();
    let n = sweep(&mut c, &batch, "superuser");
    assert!(n > 200, "{n} calls");
    eprintln!("{n} calls as superuser, outcomes: {:?}", TALLY.lock().unwrap());
    for f in [
        "metrics()",
        "metrics_prometheus()",
        "reset_metrics()",
        "pre_request()",
        "own_chain()",
        "health()",
        "latency()",
        "invalidate_cache()",
        "citus_layout()",
    ] {
        c.batch_execute(&format!("SELECT quota.{f}")).unwrap();
    }

    // As an untrusted role with malformed claims: refusals only, documented ones.
    c.batch_execute(&untrusted_role_sql("quota_sweep_user")).unwrap();
    for claims in [
        "{not json",
        "[1,2]",
        "\"sub\"",
        "{\"sub\": {\"nested\": true}}",
        "{\"sub\": null}",
    ] {
        as_role_with_claims(&mut c, "quota_sweep_user", claims);
        let before = as_session_user(&mut c, "quota_sweep_user", state);
        for sql in [
            "SELECT quota.consume(NULL, 'api')",
            "SELECT quota.refund(NULL, 'api')",
            "SELECT quota.status()",
            "SELECT quota.audit_page()",
            "SELECT quota.consume_item('shop', 'milk', 1)",
            "SELECT quota.rate_limit('default', 'someone-else')",
        ] {
            let code = c
                .batch_execute(sql)
                .err()
                .and_then(|e| e.code().map(|s| s.code().to_string()));
            assert!(
                matches!(code.as_deref(), Some("22P02") | Some("42501")),
                "claims {claims}: {sql} gave {code:?}"
            );
        }
        c.batch_execute("RESET ROLE").unwrap();
        assert_eq!(state(&mut c), before, "claims {claims}: something changed");
    }
}
