//! Each released version (sql/frozen/quota_ext--<version>.sql), filled with data, then
//! `ALTER EXTENSION quota_ext UPDATE`: nothing is lost, everything still works, and the result
//! equals a fresh install of the current version.
//!
//! pg_dump --schema-only prints only `CREATE EXTENSION` for an extension's objects, so the
//! schemas are compared through a fingerprint of the catalogs instead: every relation, column
//! (with its position, type, nullability and default), index, constraint, function definition,
//! trigger, policy, type, privilege, extension membership and what pg_dump dumps of the data.

use quota_ext_itests::{connect_to, fill, goes_on, one_text, TestDb};

const SCHEMA_FINGERPRINT: &str = "
SELECT string_agg(line, E'\\n' ORDER BY line) FROM (
  SELECT format('rel %s %s rls=%s acl=%s', c.relname, c.relkind, c.relrowsecurity, c.relacl) AS line
    FROM pg_class c WHERE c.relnamespace = 'quota'::regnamespace
  UNION ALL
  SELECT format('col %s.%s #%s %s notnull=%s default=%s', c.relname, a.attname, a.attnum,
                format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE c.relnamespace = 'quota'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT format('idx %s', pg_get_indexdef(i.indexrelid))
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'quota'::regnamespace
  UNION ALL
  SELECT format('con %s %s', conname, pg_get_constraintdef(oid)) FROM pg_constraint
   WHERE connamespace = 'quota'::regnamespace
  UNION ALL
  SELECT format('fn %s acl=%s %s', p.oid::regprocedure, p.proacl, pg_get_functiondef(p.oid))
    FROM pg_proc p WHERE p.pronamespace = 'quota'::regnamespace
  UNION ALL
  SELECT format('trg %s', pg_get_triggerdef(t.oid))
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
   WHERE c.relnamespace = 'quota'::regnamespace AND NOT t.tgisinternal
  UNION ALL
  SELECT format('pol %s.%s %s %s', c.relname, p.polname, p.polcmd, pg_get_expr(p.polqual, p.polrelid))
    FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid WHERE c.relnamespace = 'quota'::regnamespace
  UNION ALL
  SELECT format('type %s %s', t.typname, t.typtype) FROM pg_type t WHERE t.typnamespace = 'quota'::regnamespace
  UNION ALL
  SELECT format('dumped %s %L', u.rel::regclass, u.filter)
    FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(rel, filter) WHERE e.extname = 'quota_ext'
  UNION ALL
  SELECT format('member %s', pg_describe_object(classid, objid, objsubid)) FROM pg_depend
   WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
     AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'quota_ext')
) lines";

/// Every row of every 0.1.0 table, with 0.1.0's columns.
const DATA_FINGERPRINT: &str = "
SELECT concat_ws(E'\\n',
  (SELECT string_agg(t::text, ',' ORDER BY t::text) FROM quota.plans t),
  (SELECT string_agg(t::text, ',' ORDER BY t::text) FROM quota.limits t),
  (SELECT string_agg(row(subject, plan, time_zone, created_at)::text, ',' ORDER BY subject) FROM quota.subjects),
  (SELECT string_agg(t::text, ',' ORDER BY t::text) FROM quota.overrides t),
  (SELECT string_agg(t::text, ',' ORDER BY t::text) FROM quota.usage t),
  (SELECT string_agg(t::text, ',' ORDER BY t::text) FROM quota.idempotency_keys t),
  -- (the columns every version has: 0.6.0 adds actor, NULL in rows written before it)
  (SELECT string_agg(row(id, created_at, subject, action, metric, amount, success, reason, details,
                         idempotency_key)::text, ',' ORDER BY id) FROM quota.audit_log),
  (SELECT string_agg(t::text, ',' ORDER BY t::text) FROM quota.batches t),
  (SELECT string_agg(t::text, ',' ORDER BY t::text) FROM quota.rate_policies t))";

/// The version a fresh install gets.
const CURRENT: &str = "0.6.0";

#[test]
fn upgrade_from_0_1_0_keeps_everything_and_equals_a_fresh_install() {
    upgrade_from("0.1.0");
}

#[test]
fn upgrade_from_0_2_0_keeps_everything_and_equals_a_fresh_install() {
    upgrade_from("0.2.0");
}

#[test]
fn upgrade_from_0_3_0_keeps_everything_and_equals_a_fresh_install() {
    upgrade_from("0.3.0");
}

#[test]
fn upgrade_from_0_4_0_keeps_everything_and_equals_a_fresh_install() {
    upgrade_from("0.4.0");
}

#[test]
fn upgrade_from_0_5_0_keeps_everything_and_equals_a_fresh_install() {
    upgrade_from("0.5.0");
}

fn upgrade_from(from: &str) {
    // A database with a released version, filled the way an application fills it.
    let old = TestDb::bare(&format!("upgrade_old_{}", from.replace('.', "_")));
    let mut c = old.connect();
    c.batch_execute(&format!("CREATE EXTENSION quota_ext VERSION '{from}'"))
        .unwrap();
    assert_eq!(
        one_text(
            &mut c,
            "SELECT extversion FROM pg_extension WHERE extname = 'quota_ext'"
        ),
        from
    );
    let batch = fill(&mut c, "pro");
    let before = one_text(&mut c, DATA_FINGERPRINT);

    c.batch_execute("ALTER EXTENSION quota_ext UPDATE").unwrap();
    assert_eq!(
        one_text(
            &mut c,
            "SELECT extversion FROM pg_extension WHERE extname = 'quota_ext'"
        ),
        CURRENT
    );
    assert_eq!(
        one_text(&mut c, DATA_FINGERPRINT),
        before,
        "the upgrade changed data"
    );

    // Everything goes on from where it was.
    goes_on(&mut c, &batch);
    let audit_rows: i64 = c
        .query_one("SELECT count(*) FROM quota.audit_page(NULL, NULL, 1000)", &[])
        .unwrap()
        .get(0);
    assert!(audit_rows >= 12, "{audit_rows}");
    c.batch_execute("UPDATE quota.subjects SET metadata = '{\"stripe\": \"cus_1\"}' WHERE subject = 'tokyo'")
        .unwrap();

    // The upgraded schema is the schema a fresh install of the current version creates.
    let fresh = TestDb::new(&format!("upgrade_fresh_{}", from.replace('.', "_")));
    let mut f = fresh.connect();
    assert_eq!(
        one_text(
            &mut f,
            "SELECT extversion FROM pg_extension WHERE extname = 'quota_ext'"
        ),
        CURRENT
    );
    let (upgraded, installed) = (
        one_text(&mut c, SCHEMA_FINGERPRINT),
        one_text(&mut f, SCHEMA_FINGERPRINT),
    );
    if upgraded != installed {
        let a: Vec<&str> = upgraded.lines().collect();
        let b: Vec<&str> = installed.lines().collect();
        let only_upgraded: Vec<&&str> = a.iter().filter(|l| !b.contains(l)).collect();
        let only_fresh: Vec<&&str> = b.iter().filter(|l| !a.contains(l)).collect();
        panic!("schemas differ\nonly after the upgrade: {only_upgraded:#?}\nonly in a fresh install: {only_fresh:#?}");
    }
    drop(connect_to("postgres"));
}
