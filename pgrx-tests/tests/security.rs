//! The Supabase/PostgREST contract: grants, JWT identity for every consuming function, tables
//! closed to writes, row level security, pinned search_path, hostile objects, calls shaped as
//! PostgREST shapes them, and a transaction-mode pooler.

use postgres::Client;
use quota_ext_itests::{
    as_role_with_claims, code, connect_on, in_parallel_with, new_batch, one_bool, one_i64, one_text,
    table_counts, TestDb, TABLES,
};

fn err(c: &mut Client, sql: &str) -> Option<String> {
    c.batch_execute(sql).err().map(|e| code(&e))
}

fn as_role(c: &mut Client, role: &str, sub: Option<&str>) {
    let claims = match sub {
        Some(s) => format!("{{\"sub\":\"{s}\",\"role\":\"{role}\"}}"),
        None => format!("{{\"role\":\"{role}\"}}"),
    };
    as_role_with_claims(c, role, &claims);
}

fn setup(db: &TestDb) -> (Client, String) {
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 100)")
        .unwrap();
    let batch = new_batch(&mut c, "user-1", "milk", 10);
    c.batch_execute(&format!(
        "SELECT quota.create_batch('user-2', 'milk', 10);
         SELECT quota.consume('user-1', 'api'); SELECT quota.consume('user-2', 'api');
         SELECT quota.consume_batch_quantity('{batch}', 1);"
    ))
    .unwrap();
    (c, batch)
}

#[test]
fn supabase_roles_get_what_api_md_grants() {
    let db = TestDb::new("grants");
    let mut c = db.connect();
    let can = |c: &mut Client, role: &str, f: &str| {
        one_bool(
            c,
            &format!("SELECT has_function_privilege('{role}', '{f}', 'EXECUTE')"),
        )
    };
    let user_functions = [
        "quota.consume(text,text,bigint,text)",
        "quota.require(text,text,bigint,text)",
        "quota.require_decision(text,text,bigint,text)",
        "quota.refund(text,text,bigint,text)",
        "quota.status(text)",
        "quota.audit_page(text,bigint,integer)",
        "quota.consume_batch_quantity(uuid,bigint,bigint)",
        "quota.consume_item(text,text,bigint,text)",
        "quota.own_chain()",
    ];
    let admin_functions = [
        "quota.set_plan(text,text,text)",
        "quota.set_limit(text,text,text,bigint)",
        "quota.set_override(text,text,text,bigint)",
        "quota.reset_usage(text,text)",
        "quota.near_limit(double precision)",
        "quota.prune(interval,interval,interval)",
        "quota.set_parent(text,text)",
        "quota.breaker_allow(text)",
        "quota.breaker_record(text,boolean)",
        "quota.breaker_reset(text)",
        "quota.upstream_observe(text,bigint,bigint,timestamp with time zone)",
        "quota.upstream_acquire(text,bigint)",
        "quota.health()",
        "quota.latency()",
        "quota.create_batch(text,text,bigint,timestamp with time zone,jsonb)",
        "quota.metrics()",
        "quota.metrics_prometheus()",
        "quota.reset_metrics()",
        "quota.rate_check(text,bigint,interval,bigint,bigint)",
        "quota.rate_reset(text)",
        "quota.invalidate_cache()",
        "quota.citus_layout()",
    ];
    // DDL on the extension's tables: their owner's alone (tests/citus.rs calls it).
    for role in ["service_role", "authenticated", "anon"] {
        assert!(
            !can(&mut c, role, "quota.citus_prepare()"),
            "{role} must not execute quota.citus_prepare()"
        );
    }
    for f in user_functions {
        assert!(
            can(&mut c, "authenticated", f),
            "authenticated should execute {f}"
        );
        assert!(can(&mut c, "service_role", f), "service_role should execute {f}");
        assert!(!can(&mut c, "anon", f), "anon must not execute {f}");
    }
    for f in admin_functions {
        assert!(
            !can(&mut c, "authenticated", f),
            "authenticated must not execute {f}"
        );
        assert!(!can(&mut c, "anon", f), "anon must not execute {f}");
        assert!(can(&mut c, "service_role", f), "service_role should execute {f}");
    }
    // Nothing is executable by PUBLIC.
    let public = one_i64(
        &mut c,
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = 'quota' AND has_function_privilege('public', p.oid, 'EXECUTE')",
    );
    assert_eq!(public, 0);
    // anon cannot consume anything, even with a subject in its claims.
    as_role(&mut c, "anon", Some("user-1"));
    for sql in [
        "SELECT quota.consume(NULL, 'api')",
        "SELECT quota.consume_item('user-1', 'milk', 1)",
    ] {
        assert_eq!(err(&mut c, sql).as_deref(), Some("42501"));
    }
    c.batch_execute("RESET ROLE").unwrap();
}

#[test]
fn service_role_is_trusted() {
    let db = TestDb::new("service_role");
    let (mut c, _) = setup(&db);
    as_role(&mut c, "service_role", None);
    let used = one_i64(&mut c, "SELECT used FROM quota.consume('user-7', 'api')");
    assert_eq!(used, 1);
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 5); RESET ROLE")
        .unwrap();
}

/// Each backend remembers whether its user is trusted; every change of what that depends on
/// (superuser, service_role membership, quota_ext.trusted_roles and the roles it names, the
/// current role) must reach the next call, also when another session makes it.
#[test]
fn trust_follows_role_changes_at_once() {
    let db = TestDb::new("trust_changes");
    let mut admin = db.connect();
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS qe_trust_probe; DROP ROLE IF EXISTS qe_trust_group;
             CREATE ROLE qe_trust_probe; GRANT authenticated TO qe_trust_probe;
             SELECT quota.set_limit('free', 'api', 'day', 1000);",
        )
        .unwrap();
    let mut c = db.connect();
    as_role(&mut c, "qe_trust_probe", Some("probe-self"));
    // Acting for another subject needs trust: 42501 when untrusted, a decision when trusted.
    let trusted = |c: &mut Client| -> bool {
        match c.query_one("SELECT allowed FROM quota.consume('someone-else', 'api')", &[]) {
            Ok(_) => true,
            Err(e) if code(&e) == "42501" => false,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    };
    // Each step: who runs what (the admin's session or the probe's own), then whether the
    // probe's next call is trusted.
    const ADMIN: bool = true;
    const SELF: bool = false;
    let steps = [
        (SELF, "", false, "a plain authenticated member is not trusted"),
        (SELF, "", false, "and stays so when asked again"),
        (
            ADMIN,
            "GRANT service_role TO qe_trust_probe",
            true,
            "service_role granted by another session",
        ),
        (
            ADMIN,
            "REVOKE service_role FROM qe_trust_probe",
            false,
            "service_role revoked",
        ),
        (
            ADMIN,
            "ALTER ROLE qe_trust_probe SUPERUSER",
            true,
            "made superuser",
        ),
        (
            ADMIN,
            "ALTER ROLE qe_trust_probe NOSUPERUSER",
            false,
            "superuser taken away",
        ),
        // A listed role that does not exist yet, then is created and granted, then dropped.
        (
            SELF,
            "RESET ROLE; SET quota_ext.trusted_roles = 'qe_trust_group'; SET ROLE qe_trust_probe",
            false,
            "the listed role does not exist",
        ),
        (
            ADMIN,
            "CREATE ROLE qe_trust_group; GRANT qe_trust_group TO qe_trust_probe",
            true,
            "the listed role created and granted",
        ),
        (
            ADMIN,
            "DROP ROLE qe_trust_group",
            false,
            "the listed role dropped",
        ),
        // The setting's text and the current role, changed in the session itself.
        (
            SELF,
            "RESET ROLE; SET quota_ext.trusted_roles = 'authenticated'; SET ROLE qe_trust_probe",
            true,
            "a role it belongs to listed",
        ),
        (
            SELF,
            "RESET ROLE; SET quota_ext.trusted_roles = ''; SET ROLE qe_trust_probe",
            false,
            "the list emptied",
        ),
        (SELF, "RESET ROLE", true, "back to the superuser"),
        // In one transaction: a membership granted in it counts at once, and is gone after
        // ROLLBACK.
        (
            SELF,
            "BEGIN; GRANT service_role TO qe_trust_probe; SET LOCAL ROLE qe_trust_probe",
            true,
            "granted in this transaction",
        ),
        (
            SELF,
            "ROLLBACK; SET ROLE qe_trust_probe",
            false,
            "the grant rolled back",
        ),
    ];
    for (by_admin, sql, expected, why) in steps {
        if !sql.is_empty() {
            let session = if by_admin { &mut admin } else { &mut c };
            session.batch_execute(sql).unwrap();
        }
        assert_eq!(trusted(&mut c), expected, "{why}");
    }
    c.batch_execute("RESET ROLE").unwrap();
    drop(c);
    admin.batch_execute("DROP ROLE qe_trust_probe").unwrap();
}

#[test]
fn every_consuming_function_acts_only_as_the_jwt_subject() {
    let db = TestDb::new("jwt_subject");
    let (mut c, batch) = setup(&db);
    // Grants each user received itself, which it may refund.
    for u in ["1", "2"] {
        as_role(&mut c, "authenticated", Some(&format!("user-{u}")));
        c.batch_execute(&format!("SELECT quota.consume(NULL, 'api', 1, 'grant-{u}')"))
            .unwrap();
    }
    c.batch_execute("RESET ROLE").unwrap();
    let before = table_counts(&mut c);
    // (call as self, call for another subject)
    let calls = [
        (
            "SELECT quota.consume('user-1', 'api')",
            "SELECT quota.consume('user-2', 'api')",
        ),
        (
            "SELECT quota.require('user-1', 'api')",
            "SELECT quota.require('user-2', 'api')",
        ),
        (
            "SELECT quota.require_decision('user-1', 'api')",
            "SELECT quota.require_decision('user-2', 'api')",
        ),
        (
            // An untrusted caller refunds only a grant it received, by its idempotency key.
            "SELECT quota.refund('user-1', 'api', 1, 'grant-1')",
            "SELECT quota.refund('user-2', 'api', 1, 'grant-2')",
        ),
        ("SELECT quota.status('user-1')", "SELECT quota.status('user-2')"),
        (
            "SELECT quota.audit_page('user-1')",
            "SELECT quota.audit_page('user-2')",
        ),
        (
            "SELECT quota.consume_item('user-1', 'milk', 1)",
            "SELECT quota.consume_item('user-2', 'milk', 1)",
        ),
    ];
    for (own, other) in calls {
        as_role(&mut c, "authenticated", Some("user-1"));
        assert_eq!(err(&mut c, other).as_deref(), Some("42501"), "{other}");
        as_role(&mut c, "authenticated", None);
        assert_eq!(
            err(&mut c, own).as_deref(),
            Some("42501"),
            "{own} without a subject"
        );
        c.batch_execute("RESET ROLE").unwrap();
        assert_eq!(table_counts(&mut c), before, "{other} changed something");
    }
    // The other user's batch, by id.
    let theirs = one_text(
        &mut c,
        "SELECT id::text FROM quota.batches WHERE owner = 'user-2'",
    );
    let consume_one_of = |batch: &str| format!("SELECT quota.consume_batch_quantity('{batch}', 1)");
    as_role(&mut c, "authenticated", Some("user-1"));
    assert_eq!(err(&mut c, &consume_one_of(&theirs)).as_deref(), Some("42501"));
    // The library function under consume_batch_quantity applies the same rule when called
    // directly.
    assert_eq!(
        err(
            &mut c,
            &format!("SELECT quota.take_batch_quantity('{theirs}', 1)")
        )
        .as_deref(),
        Some("42501")
    );
    // Its own calls pass.
    for (own, _) in calls {
        assert_eq!(err(&mut c, own), None, "{own}");
    }
    assert_eq!(err(&mut c, &consume_one_of(&batch)), None);
    c.batch_execute("RESET ROLE").unwrap();
}

#[test]
fn tables_are_closed_to_writes_and_rows_are_private() {
    let db = TestDb::new("tables");
    let (mut c, _) = setup(&db);
    let before = table_counts(&mut c);
    for role in ["anon", "authenticated"] {
        as_role(&mut c, role, Some("user-1"));
        // (TABLES are those of every version, for the upgrade tests; the stripes are 0.10.0's.)
        for t in TABLES.into_iter().chain(["usage_stripes"]) {
            let col = text_column(t);
            for sql in [
                format!("INSERT INTO quota.{t} DEFAULT VALUES"),
                format!("UPDATE quota.{t} SET {col} = {col}"),
                format!("DELETE FROM quota.{t}"),
                format!("TRUNCATE quota.{t}"),
            ] {
                assert_eq!(err(&mut c, &sql).as_deref(), Some("42501"), "{role}: {sql}");
            }
        }
        c.batch_execute("RESET ROLE").unwrap();
    }
    assert_eq!(table_counts(&mut c), before);
    // Hot windows of both users (the second consume of a window with a row is hot), so that
    // their stripes exist.
    c.batch_execute(
        "SET quota_ext.hot_after = 1; SELECT quota.consume('user-1', 'api'); SELECT quota.consume('user-2', 'api');
         RESET quota_ext.hot_after;",
    )
    .unwrap();
    assert_eq!(
        one_i64(&mut c, "SELECT count(DISTINCT subject) FROM quota.usage_stripes"),
        2
    );
    // Row level security: authenticated reads its own usage (rows, stripes, totals), audit and
    // batch rows only.
    as_role(&mut c, "authenticated", Some("user-1"));
    for (t, col) in [
        ("usage", "subject"),
        ("usage_stripes", "subject"),
        ("usage_totals", "subject"),
        ("audit_log", "subject"),
        ("batches", "owner"),
    ] {
        let others = one_i64(
            &mut c,
            &format!("SELECT count(*) FROM quota.{t} WHERE {col} IS DISTINCT FROM 'user-1'"),
        );
        let mine = one_i64(&mut c, &format!("SELECT count(*) FROM quota.{t}"));
        assert_eq!(others, 0, "{t}: saw other subjects' rows");
        assert!(mine > 0, "{t}: saw none of its own rows");
    }
    assert_eq!(
        err(&mut c, "SELECT * FROM quota.subjects").as_deref(),
        Some("42501")
    );
    // anon reads no usage at all.
    as_role(&mut c, "anon", Some("user-1"));
    for t in ["usage", "usage_stripes", "usage_totals"] {
        assert_eq!(
            err(&mut c, &format!("SELECT * FROM quota.{t}")).as_deref(),
            Some("42501"),
            "anon: {t}"
        );
    }
    c.batch_execute("RESET ROLE").unwrap();
}

fn text_column(t: &str) -> &'static str {
    match t {
        "plans" => "description",
        "limits" => "metric",
        "batches" => "owner",
        "rate_policies" => "policy",
        _ => "subject",
    }
}

#[test]
fn functions_pin_search_path_and_the_script_replaces_nothing() {
    let db = TestDb::new("search_path");
    let mut c = db.connect();
    // Every function that reads or writes tables runs with a pinned search_path. The exceptions
    // run no SQL that could resolve a name through the caller's path: an inlinable SQL helper, a
    // trigger that queues an invalidation, rate_check (shared memory only), consume_batch_quantity
    // (plpgsql whose every name and operator is schema-qualified); and the functions on
    // the request path (consume, require_decision, refund, status, take_batch_quantity,
    // consume_item, rate_limit, request_rate_decision, request_rate_limit, own_chain, the
    // breaker functions), whose every
    // statement runs inside the
    // switch to the extension owner, which pins the search path for exactly those statements, so
    // a call does not pay for a function-level setting (hostile_objects_in_public_change_nothing
    // calls each of them). None is SECURITY DEFINER without one.
    let unpinned: Vec<String> = c
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'quota'
                AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
              ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        unpinned,
        [
            "breaker_allow",
            "breaker_record",
            "breaker_reset",
            "consume",
            "consume_batch_quantity",
            "consume_item",
            "invalidate_limits_cache",
            "own_chain",
            "rate_check",
            "rate_limit",
            "refund",
            "request_rate_decision",
            "request_rate_limit",
            "require_decision",
            "status",
            "take_batch_quantity",
            "upstream_acquire",
            "upstream_observe",
            "window_bounds"
        ]
        .map(String::from)
        .to_vec()
    );
    let definer_unpinned = one_i64(
        &mut c,
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = 'quota' AND p.prosecdef AND p.proconfig IS NULL",
    );
    assert_eq!(definer_unpinned, 0);
    // The install script creates everything anew: nothing it could silently take over.
    let script = one_text(
        &mut c,
        "SELECT pg_read_file((SELECT setting FROM pg_config WHERE name = 'SHAREDIR') || '/extension/quota_ext--0.1.0.sql')",
    );
    let upper = script.to_uppercase();
    assert!(
        !upper.contains("OR REPLACE"),
        "install script uses CREATE OR REPLACE"
    );
    assert!(
        !upper.contains("IF NOT EXISTS"),
        "install script uses IF NOT EXISTS"
    );
}

#[test]
fn hostile_objects_in_public_change_nothing() {
    let db = TestDb::new("hostile");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_limit('free', 'api', 'day', 2);
         CREATE TABLE public.stolen (what text);
         -- An = for text that always matches and records its calls, and look-alikes of functions
         -- the extension calls, all ahead of pg_catalog on the caller's search_path.
         CREATE FUNCTION public.evil_eq(text, text) RETURNS boolean LANGUAGE sql
             AS $$ INSERT INTO public.stolen VALUES ($1 || '=' || $2) RETURNING true $$;
         CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.evil_eq);
         CREATE FUNCTION public.array_position(text[], text) RETURNS integer LANGUAGE sql
             AS $$ INSERT INTO public.stolen VALUES ('array_position') RETURNING 1 $$;
         CREATE FUNCTION public.greatest(bigint, bigint) RETURNS bigint LANGUAGE sql
             AS $$ INSERT INTO public.stolen VALUES ('greatest') RETURNING 0::bigint $$;
         CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql
             AS $$ SELECT '2000-01-01'::timestamptz $$;
         SET search_path = public, pg_catalog;",
    )
    .unwrap();
    let mut granted = 0;
    for _ in 0..3 {
        let ok = one_bool(&mut c, "SELECT allowed FROM quota.consume('ann', 'api')");
        granted += ok as i64;
    }
    c.batch_execute(
        "SELECT quota.refund('ann', 'api'); SELECT quota.status('ann'); SELECT quota.near_limit();
         SELECT quota.own_chain(); SELECT quota.breaker_allow('hostile');
         SELECT quota.rate_limit('default'); SELECT quota.request_rate_decision('GET');
         SELECT quota.request_rate_limit('GET');
         SELECT quota.require('bob', 'api');
         SELECT quota.consume_batch_quantity(
                    (quota.create_batch('shop', 'milk', 10, pg_catalog.now() + interval '1 day')).id, 2);
         SELECT quota.take_batch_quantity((SELECT id FROM quota.batches WHERE owner OPERATOR(pg_catalog.=) 'shop'), 1);
         SELECT quota.consume_item('shop', 'milk', 2);",
    )
    .unwrap();
    c.batch_execute("RESET search_path").unwrap();
    assert_eq!(granted, 2, "the limit held");
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT sum(quantity)::bigint FROM quota.batches WHERE owner = 'shop'"
        ),
        5,
        "the batch functions took what they were asked"
    );
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT used FROM quota.usage_totals WHERE subject = 'ann'"
        ),
        1
    );
    assert_eq!(
        one_i64(&mut c, "SELECT count(*) FROM public.stolen"),
        0,
        "a hostile object ran"
    );
    let window_ok = one_bool(
        &mut c,
        "SELECT window_start = date_trunc('day', now(), 'UTC') FROM quota.usage WHERE subject = 'ann'",
    );
    assert!(window_ok, "the window came from pg_catalog.now()");
}

/// The request-path functions pin the search path only for their own statements: after a call,
/// and after an ERROR raised inside one of their statements and caught by the caller, the
/// caller's own search path is back in force (nothing leaks into the rest of the transaction).
#[test]
fn the_pinned_search_path_ends_with_the_call_also_after_an_error() {
    let db = TestDb::new("path_scope");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_limit('free', 'api', 'day', 10);
         CREATE SCHEMA app;
         CREATE TABLE app.mine (n int);
         INSERT INTO app.mine VALUES (7);
         -- An ERROR from inside consume's own statement (its audit row), as a failing
         -- user trigger or a lock timeout would give.
         CREATE FUNCTION app.boom() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.subject = 'boom' THEN RAISE EXCEPTION 'boom'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER boom BEFORE INSERT ON quota.audit_log
             FOR EACH ROW EXECUTE FUNCTION app.boom();",
    )
    .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        "SET LOCAL search_path = app, public;
         SELECT quota.consume('ann', 'api');
         DO $$ BEGIN
             BEGIN
                 PERFORM quota.consume('boom', 'api');
                 RAISE EXCEPTION 'consume did not fail';
             EXCEPTION WHEN raise_exception THEN
                 IF SQLERRM <> 'boom' THEN RAISE; END IF;
             END;
         END $$;",
    )
    .unwrap();
    assert_eq!(
        one_text(
            &mut tx,
            "SELECT (SELECT n FROM mine)::text || ' ' || current_schemas(false)::text"
        ),
        "7 {app,public}",
        "the caller's search path is back after a call and after a caught error"
    );
    tx.commit().unwrap();
    // The failed call changed nothing; the first one counted.
    assert_eq!(
        one_i64(&mut c, "SELECT count(*) FROM quota.usage WHERE subject = 'boom'"),
        0
    );
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT used FROM quota.usage_totals WHERE subject = 'ann'"
        ),
        1
    );
    // An uncaught one ends its transaction; the session goes on with its own path.
    c.batch_execute("SET search_path = app").unwrap();
    let e = c
        .batch_execute("SELECT quota.consume('boom', 'api')")
        .unwrap_err();
    assert_eq!(code(&e), "P0001");
    assert_eq!(
        one_text(
            &mut c,
            "SELECT (SELECT n FROM mine)::text || ' ' || current_schemas(false)::text"
        ),
        "7 {app}"
    );
}

/// What PostgREST sends for `POST /rpc/<fn>` with a JSON body, inside its transaction.
fn rpc(
    c: &mut Client,
    role: &str,
    sub: &str,
    function: &str,
    args: &[(&str, &str)],
    body: &str,
) -> serde_like::Json {
    let cols: Vec<String> = args.iter().map(|(n, t)| format!("\"{n}\" {t}")).collect();
    let named: Vec<String> = args
        .iter()
        .map(|(n, _)| format!("\"{n}\" := pgrst_args.\"{n}\""))
        .collect();
    let names: Vec<String> = args.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    let args_from = if args.is_empty() {
        String::new()
    } else {
        format!(
            ", LATERAL (SELECT {} FROM json_to_record(pgrst_payload.json_data) AS _({}) LIMIT 1) pgrst_args",
            names.join(", "),
            cols.join(", ")
        )
    };
    let sql = format!(
        "WITH pgrst_source AS (
           SELECT pgrst_call.*
             FROM (SELECT $1::text::json AS json_data) pgrst_payload{args_from},
                  LATERAL quota.{function}({named}) pgrst_call)
         SELECT coalesce(json_agg(_postgrest_t), '[]')::text FROM (SELECT * FROM pgrst_source) _postgrest_t",
        named = named.join(", "),
    );
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL ROLE {role};
         SELECT set_config('request.jwt.claims', '{{\"sub\":\"{sub}\",\"role\":\"{role}\"}}', true);
         SELECT set_config('request.method', 'POST', true);
         SELECT set_config('request.path', '/rpc/{function}', true);"
    ))
    .unwrap();
    let out: String = tx.query_one(&sql, &[&body]).unwrap().get(0);
    tx.commit().unwrap();
    serde_like::Json(out)
}

mod serde_like {
    /// The JSON text PostgREST would send back; the tests check its keys and values as text.
    pub struct Json(pub String);
    impl Json {
        pub fn has(&self, fragment: &str) -> bool {
            self.0.contains(fragment)
        }
    }
}

#[test]
fn postgrest_rpc_calls_answer_the_documented_json() {
    let db = TestDb::new("postgrest");
    let (mut c, batch) = setup(&db);
    let decision_keys = [
        "\"allowed\"",
        "\"subject\"",
        "\"metric\"",
        "\"period\"",
        "\"used\"",
        "\"quota_limit\"",
        "\"remaining\"",
        "\"reset_at\"",
        "\"retry_after_seconds\"",
        "\"replayed\"",
        "\"binding_subject\"",
    ];
    let consume_args = [
        ("metric", "text"),
        ("amount", "bigint"),
        ("idempotency_key", "text"),
    ];
    // What user-1 sends, as PostgREST passes it on.
    let as_user = |c: &mut Client, function: &str, args: &[(&str, &str)], body: &str| {
        rpc(c, "authenticated", "user-1", function, args, body)
    };
    let consume_body = r#"{"metric":"api","amount":2,"idempotency_key":"k-1"}"#;
    let out = as_user(&mut c, "consume", &consume_args, consume_body);
    for k in decision_keys {
        assert!(out.has(k), "consume: {k} missing in {}", out.0);
    }
    assert!(
        out.has("\"allowed\":true") && out.has("\"subject\":\"user-1\"") && out.has("\"used\":3"),
        "{}",
        out.0
    );
    let again = as_user(&mut c, "consume", &consume_args, consume_body);
    assert!(
        again.has("\"replayed\":true") && again.has("\"used\":3"),
        "{}",
        again.0
    );
    let metric_arg: &[(&str, &str)] = &[("metric", "text")];
    for (function, args, body, expected) in [
        (
            "refund",
            &consume_args[..],
            r#"{"metric":"api","amount":1,"idempotency_key":"k-1"}"#,
            "\"used\":2",
        ),
        ("require", metric_arg, r#"{"metric":"api"}"#, "\"allowed\":true"),
        (
            "require_decision",
            metric_arg,
            r#"{"metric":"api"}"#,
            "\"allowed\":true",
        ),
    ] {
        let out = as_user(&mut c, function, args, body);
        assert!(out.has(expected), "{}", out.0);
    }
    let out = as_user(&mut c, "status", &[], "{}");
    assert!(
        out.0.starts_with("[{") && out.has("\"metric\":\"api\"") && out.has("\"quota_limit\":100"),
        "{}",
        out.0
    );
    let out = as_user(&mut c, "own_chain", &[], "{}");
    assert!(out.has(r#"["user-1"]"#), "{}", out.0);
    let out = as_user(
        &mut c,
        "audit_page",
        &[("page_size", "integer")],
        r#"{"page_size":2}"#,
    );
    assert!(
        out.has("\"action\"") && out.has("\"details\"") && !out.has("user-2"),
        "{}",
        out.0
    );
    let out = as_user(
        &mut c,
        "consume_batch_quantity",
        &[("p_batch_id", "uuid"), ("p_quantity_to_consume", "bigint")],
        &format!(r#"{{"p_batch_id":"{batch}","p_quantity_to_consume":2}}"#),
    );
    assert!(
        out.has(&format!("\"batch_id\":\"{batch}\""))
            && out.has("\"consumed\":2")
            && out.has("\"remaining\":7")
            && out.has("\"version\":3"),
        "{}",
        out.0
    );
    let out = as_user(
        &mut c,
        "consume_item",
        &[("owner", "text"), ("item", "text"), ("quantity", "bigint")],
        r#"{"owner":"user-1","item":"milk","quantity":1}"#,
    );
    assert!(
        out.has("\"consumed\":1") && out.has("\"remaining\":6"),
        "{}",
        out.0
    );
    // service_role reaches the admin functions the same way.
    let out = rpc(
        &mut c,
        "service_role",
        "admin",
        "near_limit",
        &[("threshold", "double precision")],
        r#"{"threshold":0}"#,
    );
    assert!(
        out.has("\"ratio\"") && out.has("\"subject\":\"user-1\""),
        "{}",
        out.0
    );
    let take_body = format!(r#"{{"p_batch_id":"{batch}","p_quantity_to_consume":1}}"#);
    // The admin, batch, rate and metrics functions, as service_role calls them. (A function
    // returning a scalar or void comes back as the column the call is aliased to, pgrst_call;
    // PostgREST answers such calls with the bare value.)
    let admin_calls: [(&str, &[(&str, &str)], &str, &[&str]); 27] = [
        (
            "window_bounds",
            &[
                ("period", "text"),
                ("time_zone", "text"),
                ("at_time", "timestamptz"),
            ],
            r#"{"period":"week","time_zone":"UTC","at_time":"2026-11-22T12:00:00Z"}"#,
            &[
                r#""window_start":"2026-11-16T00:00:00+00:00""#,
                r#""reset_at":"2026-11-23T00:00:00+00:00""#,
            ],
        ),
        (
            "set_plan",
            &[("subject", "text"), ("plan", "text"), ("time_zone", "text")],
            r#"{"subject":"user-9","plan":"pro","time_zone":"Europe/Paris"}"#,
            &[r#"{"pgrst_call":""}"#],
        ),
        ("health", &[], "{}", &[r#""check":"preload""#, r#""ok":true"#]),
        ("latency", &[], "{}", &[r#""function":"consume""#, r#""p95_ms""#]),
        (
            "upstream_observe",
            &[
                ("api", "text"),
                ("quota_limit", "bigint"),
                ("remaining", "bigint"),
                ("reset_at", "timestamptz"),
            ],
            r#"{"api":"rpc-api","quota_limit":5000,"remaining":42,"reset_at":"2126-01-01T00:00:00Z"}"#,
            &[r#""remaining":42"#, r#""reset_at":"2126-01-01T00:00:00+00:00""#],
        ),
        (
            "upstream_acquire",
            &[("api", "text")],
            r#"{"api":"rpc-api"}"#,
            &[r#""allowed":true"#, r#""remaining":41"#],
        ),
        (
            "breaker_record",
            &[("name", "text"), ("success", "boolean")],
            r#"{"name":"rpc-breaker","success":false}"#,
            &[r#""state":"closed""#, r#""failures":1"#],
        ),
        (
            "breaker_allow",
            &[("name", "text")],
            r#"{"name":"rpc-breaker"}"#,
            &[r#""allowed":true"#, r#""retry_after_seconds":0"#],
        ),
        (
            "breaker_reset",
            &[("name", "text")],
            r#"{"name":"rpc-breaker"}"#,
            &[r#""failures":0"#],
        ),
        (
            "set_parent",
            &[("subject", "text"), ("parent", "text")],
            r#"{"subject":"user-8","parent":"user-9"}"#,
            &[r#"{"pgrst_call":""}"#],
        ),
        (
            "set_limit",
            &[
                ("plan", "text"),
                ("metric", "text"),
                ("period", "text"),
                ("max_amount", "bigint"),
            ],
            r#"{"plan":"pro","metric":"api","period":"day","max_amount":500}"#,
            &[r#"{"pgrst_call":""}"#],
        ),
        (
            "set_override",
            &[
                ("subject", "text"),
                ("metric", "text"),
                ("period", "text"),
                ("max_amount", "bigint"),
            ],
            r#"{"subject":"user-9","metric":"api","period":"day","max_amount":7}"#,
            &[r#"{"pgrst_call":""}"#],
        ),
        (
            "reset_usage",
            &[("subject", "text")],
            r#"{"subject":"user-2"}"#,
            &[r#"{"pgrst_call":1}"#],
        ),
        (
            "prune",
            &[("audit_older_than", "interval")],
            r#"{"audit_older_than":"1 year"}"#,
            &[
                r#""audit_deleted":0"#,
                r#""idempotency_deleted":0"#,
                r#""usage_deleted":0"#,
            ],
        ),
        (
            "create_batch",
            &[("owner", "text"), ("item", "text"), ("quantity", "bigint")],
            r#"{"owner":"user-9","item":"tea","quantity":4}"#,
            &[
                r#""owner":"user-9""#,
                r#""quantity":4"#,
                r#""version":1"#,
                r#""initial_quantity":4"#,
            ],
        ),
        (
            "metrics",
            &[],
            "{}",
            &[r#""name":"consumes""#, r#""description""#],
        ),
        ("metrics_prometheus", &[], "{}", &["quota_ext_consumes_total"]),
        (
            "rate_check",
            &[("key", "text"), ("rate", "bigint"), ("per", "interval")],
            r#"{"key":"rpc:k","rate":10,"per":"1 minute"}"#,
            &[
                r#""allowed":true"#,
                r#""key":"rpc:k""#,
                r#""rate_limit":10"#,
                r#""remaining":9"#,
                r#""reset_after_seconds""#,
                r#""retry_after_seconds":0"#,
            ],
        ),
        (
            "rate_reset",
            &[("key", "text")],
            r#"{"key":"rpc:k"}"#,
            &[r#"{"pgrst_call":true}"#],
        ),
        (
            "rate_limit",
            &[("policy", "text")],
            r#"{"policy":"default"}"#,
            &[r#""allowed":true"#, r#""key":"admin""#],
        ),
        (
            "request_rate_decision",
            &[("method", "text")],
            r#"{"method":"GET"}"#,
            &[r#"{"allowed":null"#],
        ),
        (
            "request_rate_limit",
            &[("method", "text")],
            r#"{"method":"GET"}"#,
            &[r#"{"pgrst_call":null}"#],
        ),
        (
            "take_batch_quantity",
            &[("p_batch_id", "uuid"), ("p_quantity_to_consume", "bigint")],
            &take_body,
            &[r#""consumed":1"#, r#""remaining":5"#],
        ),
        ("pre_request", &[], "{}", &[r#"{"pgrst_call":""}"#]),
        ("reset_metrics", &[], "{}", &[r#"{"pgrst_call":""}"#]),
        ("invalidate_cache", &[], "{}", &[r#"{"pgrst_call":""}"#]),
        (
            "citus_layout",
            &[],
            "{}",
            &[
                r#""step":1,"table_name":"quota.plans","kind":"reference","distribution_column":null,"command":"SELECT create_reference_table('quota.plans');""#,
            ],
        ),
    ];
    for (function, args, body, expected) in admin_calls {
        let out = rpc(&mut c, "service_role", "admin", function, args, body);
        for e in expected {
            assert!(out.has(e), "{function}: {e} missing in {}", out.0);
        }
    }
    // Every function of the extension was called above, as PostgREST would call it.
    let called = [
        "consume",
        "require",
        "require_decision",
        "refund",
        "status",
        "audit_page",
        "consume_batch_quantity",
        "consume_item",
        "near_limit",
        "set_plan",
        "set_parent",
        "own_chain",
        "breaker_allow",
        "breaker_record",
        "breaker_reset",
        "upstream_observe",
        "upstream_acquire",
        "health",
        "latency",
        "set_limit",
        "set_override",
        "reset_usage",
        "prune",
        "create_batch",
        "metrics",
        "metrics_prometheus",
        "rate_check",
        "rate_reset",
        "rate_limit",
        "request_rate_decision",
        "request_rate_limit",
        "take_batch_quantity",
        "pre_request",
        "reset_metrics",
        "window_bounds",
        "invalidate_cache",
        "citus_layout",
        // The owner's alone (tests/citus.rs; refused to service_role above).
        "citus_prepare",
    ];
    let not_called: Vec<String> = c
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'quota' AND p.prorettype <> 'trigger'::regtype
                AND NOT (p.proname = ANY ($1))",
            &[&called.iter().map(|s| s.to_string()).collect::<Vec<String>>()],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        not_called.is_empty(),
        "functions the contract test does not call: {not_called:?}"
    );

    // PostgREST runs STABLE functions in read-only transactions.
    let volatility: Vec<(String, String)> = c
        .query(
            "SELECT p.proname::text, p.provolatile::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'quota' AND p.proname IN ('consume', 'require', 'require_decision', 'refund', 'consume_batch_quantity', 'consume_item', 'status', 'audit_page')
              ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (f, v) in volatility {
        let expected = if f == "status" || f == "audit_page" {
            "s"
        } else {
            "v"
        };
        assert_eq!(v, expected, "{f}");
    }
}

#[test]
fn exact_totals_through_pgbouncer_in_transaction_mode() {
    let port = quota_ext_itests::env_port("QUOTA_EXT_PGBOUNCER_PORT");
    let db = TestDb::new("pgbouncer");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 300)")
        .unwrap();
    const SESSIONS: usize = 8;
    let outcomes = in_parallel_with(
        SESSIONS,
        || connect_on(port, &db.name),
        |i, c, start| {
            start();
            let (mut granted, mut errors) = (0i64, Vec::new());
            for n in 0..60 {
                // Simple protocol, and every transaction sets its own claims, as PostgREST
                // does: nothing relies on the server session staying the same.
                let sql = format!(
                    "BEGIN; SELECT set_config('request.jwt.claims', '{{\"sub\":\"s{i}\"}}', true);
                         SELECT allowed FROM quota.consume('hot', 'api', 1, 'k-{i}-{n}'); COMMIT;"
                );
                match c.simple_query(&sql) {
                    Ok(msgs) => {
                        for m in msgs {
                            if let postgres::SimpleQueryMessage::Row(r) = m {
                                if r.get(0) == Some("t") {
                                    granted += 1;
                                }
                            }
                        }
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (granted, errors)
        },
    );
    let mut granted = 0;
    for (g, e) in outcomes {
        assert!(e.is_empty(), "{e:?}");
        granted += g;
    }
    assert_eq!(granted, 300);
    assert_eq!(one_i64(&mut c, "SELECT used FROM quota.usage_totals"), 300);
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT count(*) FROM quota.audit_log WHERE action = 'consume' AND success"
        ),
        300
    );
    assert_eq!(
        one_i64(&mut c, "SELECT count(*) FROM quota.idempotency_keys"),
        480
    );
}
