//! Supabase's database linter, splinter: its 28 lint queries (tests/splinter/lints.sql, taken
//! from github.com/supabase/splinter and adapted to a server without Supabase's own schemas)
//! run against a database with quota_ext, schema quota exposed as a Supabase user exposes it.
//! A Supabase project shows ERROR and WARN findings in red in its advisors: there must be none.
//! (0.5.0 had two ERRORs, rls_disabled_in_public on plans and limits, and three WARNs,
//! auth_rls_initplan on the three policies.)

use postgres::SimpleQueryMessage;
use quota_ext_itests::TestDb;

#[test]
fn supabase_advisors_find_no_error_or_warning() {
    let db = TestDb::new("splinter");
    let mut c = db.connect();
    // Data, so that the lints that look at statistics and sizes see a used database.
    c.batch_execute(
        "SELECT quota.set_limit('free', 'api', 'day', 10); SELECT quota.consume('a', 'api');
         SELECT quota.create_batch('a', 'milk', 3);
         SET pgrst.db_schemas = 'public, quota'; SET search_path = '';",
    )
    .unwrap();
    let lints = include_str!("splinter/lints.sql");
    let mut findings = Vec::new();
    let mut statements = 0;
    for m in c.simple_query(lints).unwrap() {
        match m {
            SimpleQueryMessage::Row(r) => {
                let level = r.get("level").unwrap_or_default().to_string();
                let key = r.get("cache_key").unwrap_or_default().to_string();
                if level == "ERROR" || level == "WARN" {
                    findings.push(format!("{level} {key}"));
                }
            }
            SimpleQueryMessage::CommandComplete(_) => statements += 1,
            _ => {}
        }
    }
    assert_eq!(statements, 28, "all 28 lints ran");
    assert!(
        findings.is_empty(),
        "Supabase's advisors would show: {findings:#?}"
    );
}
