//! Each released version (sql/frozen/quota_ext--<version>.sql), filled with data, then
//! `ALTER EXTENSION quota_ext UPDATE`: nothing is lost, everything still works, and the result
//! equals a fresh install of the current version.
//!
//! pg_dump --schema-only prints only `CREATE EXTENSION` for an extension's objects, so the
//! schemas are compared through a fingerprint of the catalogs instead (SCHEMA_FINGERPRINT).

use quota_ext_itests::{
    connect_to, data_fingerprint, fill, goes_on, one_bool, one_i64, one_text, TestDb, SCHEMA_FINGERPRINT,
};

/// Every row of every 0.1.0 table, with 0.1.0's columns (0.8.0 adds subjects.parent, NULL in
/// rows written before it).
fn data_of_0_1_0() -> String {
    data_fingerprint(&[
        (
            "subjects",
            "(SELECT string_agg(row(subject, plan, time_zone, created_at)::text, ',' ORDER BY subject) FROM quota.subjects)",
        ),
        (
            "rate_policies",
            "-- (0.8.0 adds pooled, false in rows written before it)
  (SELECT string_agg(row(policy, plan, rate, per, burst, shadow)::text, ',' ORDER BY policy, plan) FROM quota.rate_policies)",
        ),
        (
            "audit_log",
            "-- (the columns every version has: 0.6.0 adds actor, NULL in rows written before it;
  -- 0.9.0 writes '' for the subject NULL of administrative rows that concern no subject)
  (SELECT string_agg(row(id, created_at, nullif(subject, ''), action, metric, amount, success, reason, details,
                         idempotency_key)::text, ',' ORDER BY id) FROM quota.audit_log)",
        ),
    ])
}

/// The installed version of quota_ext.
fn version(c: &mut postgres::Client) -> String {
    one_text(
        c,
        "SELECT extversion FROM pg_extension WHERE extname = 'quota_ext'",
    )
}

/// The version a fresh install gets.
const CURRENT: &str = "0.10.0";

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

#[test]
fn upgrade_from_0_6_0_keeps_everything_and_equals_a_fresh_install() {
    upgrade_from("0.6.0");
}

#[test]
fn upgrade_from_0_7_0_keeps_everything_and_equals_a_fresh_install() {
    upgrade_from("0.7.0");
}

#[test]
fn upgrade_from_0_9_0_keeps_everything_and_equals_a_fresh_install() {
    upgrade_from("0.9.0");
}

#[test]
fn upgrade_from_0_8_0_keeps_everything_and_equals_a_fresh_install() {
    upgrade_from("0.8.0");
}

fn upgrade_from(from: &str) {
    // A database with a released version, filled the way an application fills it.
    let old = TestDb::bare(&format!("upgrade_old_{}", from.replace('.', "_")));
    let mut c = old.connect();
    c.batch_execute(&format!("CREATE EXTENSION quota_ext VERSION '{from}'"))
        .unwrap();
    assert_eq!(version(&mut c), from);
    let batch = fill(&mut c, "pro");
    // A role that reads usage rows, granted by hand (as without the Supabase roles; from 0.8.0
    // on, the usage policy calls quota.own_chain(), which such a role is granted too).
    let reader = format!("upgrade_reader_{}", from.replace('.', "_"));
    c.batch_execute(&format!(
        "DO $$ BEGIN CREATE ROLE {reader} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT USAGE ON SCHEMA quota TO {reader}; GRANT SELECT ON quota.usage TO {reader};
         DO $$ BEGIN
             IF to_regprocedure('quota.own_chain()') IS NOT NULL THEN
                 GRANT EXECUTE ON FUNCTION quota.own_chain() TO {reader};
             END IF;
         END $$;"
    ))
    .unwrap();
    // A session open across the update (as a pooled connection is) that has charged before it.
    let mut open = old.connect();
    open.batch_execute("SELECT quota.consume('open-session', 'api')")
        .unwrap();
    let before = one_text(&mut c, &data_of_0_1_0());
    // Until the upgrade, the new library writes the rows that concern no subject (the admin
    // calls of fill) with subject NULL, as the old tables and their row-level policy expect:
    // none that a JWT whose sub is '' could read.
    let no_subject =
        "SELECT count(*) FILTER (WHERE subject IS NULL) || ' ' || count(*) FILTER (WHERE subject = '')
                        FROM quota.audit_log";
    // (From 0.9.0 on the column is NOT NULL and such rows have '' already.)
    let nullable = !one_bool(
        &mut c,
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'quota.audit_log'::regclass AND attname = 'subject'",
    );
    let admin_rows = one_i64(
        &mut c,
        "SELECT count(*) FROM quota.audit_log WHERE subject IS NULL OR subject = ''",
    );
    assert!(admin_rows > 0);
    if nullable {
        assert_eq!(one_text(&mut c, no_subject), format!("{admin_rows} 0"));
    }

    c.batch_execute("ALTER EXTENSION quota_ext UPDATE").unwrap();
    assert_eq!(one_text(&mut c, no_subject), format!("0 {admin_rows}"));

    assert_eq!(version(&mut c), CURRENT);
    assert_eq!(
        one_text(&mut c, &data_of_0_1_0()),
        before,
        "the upgrade changed data"
    );
    if from == "0.9.0" {
        // The open session sees the hot windows' table at once: its second consume of a
        // window that has a usage row is hot.
        for sql in [
            "SET quota_ext.hot_after = 1",
            "SELECT quota.consume('hot-after-update', 'api')",
            "SELECT quota.consume('hot-after-update', 'api')",
        ] {
            open.batch_execute(sql).unwrap();
        }
        assert!(
            one_i64(
                &mut c,
                "SELECT count(*) FROM quota.usage_stripes WHERE subject = 'hot-after-update'"
            ) > 0,
            "the session open during the update charged the hot window"
        );
        c.batch_execute("SELECT quota.reset_usage('hot-after-update')")
            .unwrap();
    }
    drop(open);

    // Everything goes on from where it was; the reader still reads (the usage policy now
    // calls quota.own_chain(), which the upgrade granted it), then its grants go, so that the
    // schema compares with a fresh install's.
    c.batch_execute(&format!(
        "SET ROLE {reader}; SELECT count(*) FROM quota.usage; RESET ROLE;"
    ))
    .unwrap_or_else(|e| panic!("{reader} cannot read quota.usage after the upgrade: {e}"));
    c.batch_execute(&format!(
        "REVOKE ALL ON quota.usage FROM {reader}; REVOKE ALL ON SCHEMA quota FROM {reader};
         REVOKE ALL ON FUNCTION quota.own_chain() FROM {reader};"
    ))
    .unwrap();
    goes_on(&mut c, &batch);
    let audit_rows = one_i64(&mut c, "SELECT count(*) FROM quota.audit_page(NULL, NULL, 1000)");
    assert!(audit_rows >= 12, "{audit_rows}");
    c.batch_execute("UPDATE quota.subjects SET metadata = '{\"stripe\": \"cus_1\"}' WHERE subject = 'tokyo'")
        .unwrap();

    // The upgraded schema is the schema a fresh install of the current version creates.
    let fresh = TestDb::new(&format!("upgrade_fresh_{}", from.replace('.', "_")));
    let mut f = fresh.connect();
    assert_eq!(version(&mut f), CURRENT);
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
