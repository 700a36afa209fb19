//! Ready for Citus (docs/citus.md), held by the catalogs: Citus is in no registry these machines
//! reach, so nothing here runs Citus. What it refuses is checked instead, on the schema a fresh
//! install creates after quota.citus_prepare(): every table is placed by quota.citus_layout();
//! a distributed table's unique keys hold its distribution column (NOT NULL), it has no
//! trigger, its foreign keys reference only reference tables and its sequences are bigint; a
//! reference table has no trigger and references only reference tables; the layout's order
//! creates a referenced table first. Then the caches without their triggers, and the document.

use quota_ext_itests::{code, one_i64, one_text, TestDb};

/// Everything in the catalogs Citus would refuse for the layout quota.citus_layout() gives, one
/// line each.
const VIOLATIONS: &str = "
WITH layout AS (SELECT * FROM quota.citus_layout()),
tables AS (
    SELECT c.oid AS rel FROM pg_class c
     WHERE c.relnamespace = 'quota'::regnamespace AND c.relkind IN ('r', 'p')),
fk AS (
    SELECT con.conname, con.conrelid, con.confrelid FROM pg_constraint con
     WHERE con.contype = 'f' AND con.conrelid IN (SELECT rel FROM tables))
SELECT v FROM (
    SELECT format('%s is not in quota.citus_layout()', t.rel::regclass) AS v
      FROM tables t WHERE t.rel NOT IN (SELECT table_name FROM layout)
    UNION ALL
    SELECT format('%s is in quota.citus_layout() %s times', table_name, count(*))
      FROM layout GROUP BY table_name HAVING count(*) > 1
    UNION ALL
    SELECT format('%s: distribution column %s does not exist or may be NULL', l.table_name, l.distribution_column)
      FROM layout l
     WHERE l.kind = 'distributed'
       AND NOT EXISTS (SELECT FROM pg_attribute a
                        WHERE a.attrelid = l.table_name AND a.attname = l.distribution_column
                          AND a.attnotnull AND NOT a.attisdropped)
    UNION ALL
    SELECT format('%s: unique index %s does not hold %s', l.table_name, i.indexrelid::regclass, l.distribution_column)
      FROM layout l JOIN pg_index i ON i.indrelid = l.table_name AND i.indisunique
     WHERE l.kind = 'distributed'
       AND NOT (SELECT a.attnum FROM pg_attribute a
                 WHERE a.attrelid = l.table_name AND a.attname = l.distribution_column) = ANY (i.indkey::int2[])
    UNION ALL
    SELECT format('%s: exclusion constraint %s', l.table_name, con.conname)
      FROM layout l JOIN pg_constraint con ON con.conrelid = l.table_name AND con.contype = 'x'
     WHERE l.kind = 'distributed'
    UNION ALL
    SELECT format('%s (%s table): trigger %s', l.table_name, l.kind, tg.tgname)
      FROM layout l JOIN pg_trigger tg ON tg.tgrelid = l.table_name AND NOT tg.tgisinternal
    UNION ALL
    SELECT format('%s: foreign key %s references %s, not a reference table', fk.conrelid::regclass, fk.conname,
                  fk.confrelid::regclass)
      FROM fk
     WHERE fk.confrelid NOT IN (SELECT table_name FROM layout WHERE kind = 'reference')
    UNION ALL
    SELECT format('%s: foreign key %s references %s, created later in quota.citus_layout()',
                  fk.conrelid::regclass, fk.conname, fk.confrelid::regclass)
      FROM fk JOIN layout a ON a.table_name = fk.conrelid JOIN layout b ON b.table_name = fk.confrelid
     WHERE fk.conrelid <> fk.confrelid AND b.step > a.step
    UNION ALL
    SELECT format('%s: sequence %s is %s, not bigint', l.table_name, d.objid::regclass, s.seqtypid::regtype)
      FROM layout l
      JOIN pg_depend d ON d.refobjid = l.table_name AND d.classid = 'pg_class'::regclass
                      AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
      JOIN pg_sequence s ON s.seqrelid = d.objid
     WHERE l.kind = 'distributed' AND s.seqtypid <> 'bigint'::regtype
    UNION ALL
    SELECT format('%s: distribution column %s is %s, colocated with quota.usage''s subject (text)',
                  l.table_name, l.distribution_column, a.atttypid::regtype)
      FROM layout l JOIN pg_attribute a ON a.attrelid = l.table_name AND a.attname = l.distribution_column
     WHERE l.kind = 'distributed' AND a.atttypid <> 'text'::regtype
) AS all_violations
ORDER BY v";

fn violations(c: &mut impl postgres::GenericClient) -> Vec<String> {
    c.query(VIOLATIONS, &[])
        .unwrap_or_else(|e| panic!("{e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A session of `db` where quota_ext.cache_ttl is `ttl` for the server (what citus_prepare
/// looks at), here by ALTER DATABASE.
fn with_cache_ttl(db: &TestDb, ttl: &str) -> postgres::Client {
    db.connect()
        .batch_execute(&format!(
            "ALTER DATABASE {} SET quota_ext.cache_ttl = '{ttl}'",
            db.name
        ))
        .unwrap();
    db.connect()
}

fn prepared(test: &str) -> (TestDb, postgres::Client) {
    let db = TestDb::new(test);
    let mut c = with_cache_ttl(&db, "5s");
    c.batch_execute("SELECT quota.citus_prepare();").unwrap();
    (db, c)
}

#[test]
fn a_fresh_install_after_citus_prepare_has_nothing_citus_refuses() {
    let (_db, mut c) = prepared("citus_catalogs");
    assert_eq!(violations(&mut c), Vec::<String>::new());
    // The layout places 13 tables: 8 reference, 5 distributed.
    assert_eq!(
        one_text(
            &mut c,
            "SELECT string_agg(kind || ':' || table_name::text, ' ' ORDER BY step) FROM quota.citus_layout()"
        ),
        "reference:quota.plans reference:quota.limits reference:quota.subjects reference:quota.overrides \
         reference:quota.rate_policies reference:quota.rate_routes reference:quota.breakers \
         reference:quota.upstreams distributed:quota.usage distributed:quota.usage_stripes distributed:quota.idempotency_keys \
         distributed:quota.audit_log distributed:quota.batches"
    );

    // The check finds what Citus refuses: each change below, in a transaction rolled back.
    for (change, expected) in [
        (
            "ALTER TABLE quota.batches ADD CONSTRAINT batches_id_key UNIQUE (id)",
            "quota.batches: unique index quota.batches_id_key does not hold owner",
        ),
        (
            "CREATE UNIQUE INDEX audit_log_id_idx ON quota.audit_log (id)",
            "quota.audit_log: unique index quota.audit_log_id_idx does not hold subject",
        ),
        (
            "CREATE TRIGGER t AFTER INSERT ON quota.plans FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache()",
            "quota.plans (reference table): trigger t",
        ),
        (
            "CREATE TABLE quota.extra (subject text PRIMARY KEY)",
            "quota.extra is not in quota.citus_layout()",
        ),
        (
            "CREATE TABLE public.owners (owner text PRIMARY KEY);
             ALTER TABLE quota.batches ADD CONSTRAINT batches_owner_fkey FOREIGN KEY (owner) REFERENCES public.owners",
            "quota.batches: foreign key batches_owner_fkey references owners, not a reference table",
        ),
        (
            "ALTER TABLE quota.usage ADD COLUMN n serial",
            "quota.usage: sequence quota.usage_n_seq is integer, not bigint",
        ),
        (
            "ALTER TABLE quota.idempotency_keys DROP CONSTRAINT idempotency_keys_pkey, ALTER COLUMN subject DROP NOT NULL",
            "quota.idempotency_keys: distribution column subject does not exist or may be NULL",
        ),
    ] {
        let mut t = c.transaction().unwrap();
        t.batch_execute(change).unwrap_or_else(|e| panic!("{change}: {e:?}"));
        let found = violations(&mut t);
        assert!(
            found.iter().any(|v| v == expected),
            "{change}\nexpected: {expected}\nfound: {found:#?}"
        );
        t.rollback().unwrap();
    }
    assert_eq!(violations(&mut c), Vec::<String>::new());
}

#[test]
fn citus_prepare_wants_a_cache_ttl_and_the_owner() {
    let db = TestDb::new("citus_prepare_refusals");
    let mut c = db.connect();
    let triggers = "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgrelid = ANY
                    (SELECT table_name FROM quota.citus_layout())";
    let before = one_i64(&mut c, triggers);
    assert_eq!(before, 10, "8 invalidation triggers and 2 of shipped rows");
    let e = c.batch_execute("SELECT quota.citus_prepare()").unwrap_err();
    assert_eq!(code(&e), "55000", "{e:?}");
    assert!(format!("{e:?}").contains("quota_ext.cache_ttl"), "{e:?}");
    assert_eq!(one_i64(&mut c, triggers), before, "a refusal changed nothing");
    // A SET of this session alone is not the server's value: refused too.
    let e = c
        .batch_execute("SET quota_ext.cache_ttl = '5s'; SELECT quota.citus_prepare()")
        .unwrap_err();
    assert_eq!(code(&e), "55000", "{e:?}");
    c.batch_execute("RESET quota_ext.cache_ttl").unwrap();
    assert_eq!(one_i64(&mut c, triggers), before, "a refusal changed nothing");
    // service_role is trusted but does not own the tables; anon and authenticated neither.
    for role in ["service_role", "authenticated", "anon"] {
        let e = c
            .batch_execute(&format!(
                "SET quota_ext.cache_ttl = '5s'; SET ROLE {role}; SELECT quota.citus_prepare()"
            ))
            .unwrap_err();
        assert_eq!(code(&e), "42501", "{role}: {e:?}");
        c.batch_execute("RESET ROLE; RESET quota_ext.cache_ttl").unwrap();
    }
    for role in ["authenticated", "anon"] {
        let e = c
            .batch_execute(&format!("SET ROLE {role}; SELECT quota.invalidate_cache()"))
            .unwrap_err();
        assert_eq!(code(&e), "42501", "{role}: {e:?}");
        c.batch_execute("RESET ROLE").unwrap();
    }
    assert_eq!(one_i64(&mut c, triggers), before);
    // Twice is once.
    let mut c = with_cache_ttl(&db, "5s");
    c.batch_execute("SELECT quota.citus_prepare(); SELECT quota.citus_prepare();")
        .unwrap();
    assert_eq!(one_i64(&mut c, triggers), 0);
}

/// The limit a consume of 1 'calls' by 'cara' (plan free) sees.
fn limit_seen(c: &mut postgres::Client) -> i64 {
    one_i64(c, "SELECT (quota.consume('cara', 'calls', 1)).quota_limit")
}

fn set_directly(c: &mut postgres::Client, max: i64) {
    c.batch_execute(&format!(
        "UPDATE quota.limits SET max_amount = {max} WHERE plan = 'free' AND metric = 'calls' AND period = 'day'"
    ))
    .unwrap();
}

#[test]
fn without_triggers_changes_reach_the_caches_by_function_or_within_cache_ttl() {
    let (db, mut admin) = prepared("citus_caches");
    admin
        .batch_execute("SELECT quota.set_limit('free', 'calls', 'day', 1000)")
        .unwrap();
    let mut a = db.connect();
    a.batch_execute("SET quota_ext.cache_ttl = '1h'").unwrap();
    assert_eq!(limit_seen(&mut a), 1000);

    // A direct change: no trigger, so a's cache keeps the old limit (for up to an hour) ...
    set_directly(&mut admin, 2000);
    assert_eq!(
        limit_seen(&mut a),
        1000,
        "the invalidation trigger is still there"
    );
    // ... until quota.invalidate_cache() commits.
    let mut t = admin.transaction().unwrap();
    t.batch_execute("SELECT quota.invalidate_cache()").unwrap();
    assert_eq!(limit_seen(&mut a), 1000, "applied before the commit");
    t.commit().unwrap();
    assert_eq!(limit_seen(&mut a), 2000);

    // The administrative functions apply at once, and roll back with their transaction.
    admin
        .batch_execute("SELECT quota.set_limit('free', 'calls', 'day', 3000)")
        .unwrap();
    assert_eq!(limit_seen(&mut a), 3000);
    a.batch_execute("BEGIN; SELECT quota.set_limit('free', 'calls', 'day', 4000)")
        .unwrap();
    assert_eq!(limit_seen(&mut a), 4000, "the own transaction's change");
    a.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        limit_seen(&mut a),
        3000,
        "the rolled back change stayed in the cache"
    );
    // An organization at its limit: cara is denied as soon as set_parent attaches her.
    admin
        .batch_execute(
            "SELECT quota.set_plan('acme', 'free'); SELECT quota.set_override('acme', 'calls', 'day', 1);
             SELECT quota.consume('acme', 'calls', 1);",
        )
        .unwrap();
    let consume = "SELECT (quota.consume('cara', 'calls', 1)).allowed::text";
    assert_eq!(one_text(&mut a, consume), "true");
    admin
        .batch_execute("SELECT quota.set_parent('cara', 'acme')")
        .unwrap();
    assert_eq!(
        one_text(&mut a, consume),
        "false",
        "set_parent did not apply at once"
    );
    admin
        .batch_execute("SELECT quota.set_parent('cara', NULL)")
        .unwrap();
    assert_eq!(one_text(&mut a, consume), "true");
    admin
        .batch_execute("SELECT quota.set_override('cara', 'calls', 'day', 5)")
        .unwrap();
    assert_eq!(limit_seen(&mut a), 5, "set_override");

    // With a short ttl a direct change applies once it has passed.
    admin
        .batch_execute("SELECT quota.set_override('cara', 'calls', 'day', NULL)")
        .unwrap();
    a.batch_execute("SET quota_ext.cache_ttl = '200ms'").unwrap();
    assert_eq!(limit_seen(&mut a), 3000);
    set_directly(&mut admin, 6000);
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(limit_seen(&mut a), 6000);
}

#[test]
fn admin_rows_without_a_subject_and_lookups_by_id_alone() {
    let db = TestDb::new("citus_keys");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_limit('free', 'calls', 'day', 10);
         SELECT quota.consume('kim', 'calls', 1);",
    )
    .unwrap();
    assert_eq!(
        one_text(
            &mut c,
            "SELECT string_agg(quote_literal(subject), ',' ORDER BY id) FROM quota.audit_log"
        ),
        "'','kim'",
        "the set_limit row has subject ''"
    );
    // A JWT whose sub is '' reads no administrative row.
    c.batch_execute(
        "SET ROLE authenticated; SELECT set_config('request.jwt.claims', '{\"sub\": \"\", \"role\": \"authenticated\"}', false)",
    )
    .unwrap();
    assert_eq!(one_i64(&mut c, "SELECT count(*) FROM quota.audit_log"), 0);
    c.batch_execute("RESET ROLE; RESET request.jwt.claims").unwrap();

    // Look-ups by id alone use the keys' leading column (an index, whatever the table's size).
    let id = one_text(&mut c, "SELECT (quota.create_batch('kim', 'apples', 5)).id::text");
    c.batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
        .unwrap();
    for (sql, index) in [
        (
            format!("SELECT * FROM quota.batches WHERE id = '{id}'"),
            "batches_pkey",
        ),
        (
            "SELECT * FROM quota.audit_log WHERE id < 100 ORDER BY id DESC LIMIT 5".to_string(),
            "audit_log_pkey",
        ),
    ] {
        let plan: Vec<String> = c
            .query(&format!("EXPLAIN {sql}"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            plan.iter().any(|l| l.contains("Index Scan") && l.contains(index)),
            "{sql}: {plan:#?}"
        );
    }
    assert_eq!(
        one_i64(
            &mut c,
            &format!("SELECT count(*) FROM quota.consume_batch_quantity('{id}', 2)")
        ),
        1
    );
}

#[test]
fn the_document_gives_the_layouts_commands_in_order() {
    let db = TestDb::new("citus_doc");
    let mut c = db.connect();
    let commands: Vec<String> = c
        .query("SELECT command FROM quota.citus_layout() ORDER BY step", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/citus.md")).unwrap();
    let in_doc: Vec<String> = doc
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("SELECT create_"))
        .map(String::from)
        .collect();
    assert_eq!(in_doc, commands, "docs/citus.md and quota.citus_layout() differ");
}
