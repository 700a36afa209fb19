//! Helpers for the external tests: a fresh database per test on the server that
//! `scripts/test.sh` started (QUOTA_EXT_TEST_PORT), and small query helpers.

use postgres::{Client, NoTls};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The port of a server scripts/test.sh started, from its environment variable.
pub fn env_port(var: &str) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{var} is not set: run these tests through scripts/test.sh"))
}

/// The main test server.
pub fn port() -> u16 {
    env_port("QUOTA_EXT_TEST_PORT")
}

pub fn connect_to(db: &str) -> Client {
    connect_on(port(), db)
}

/// A connection to database `db` of the test server on `port`.
pub fn connect_on(port: u16, db: &str) -> Client {
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname={db}");
    Client::connect(&url, NoTls).unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A new database with quota_ext created in it, named after the test, on the main test server
/// or (TestDb::on) on another server scripts/test.sh started.
pub struct TestDb {
    pub name: String,
    pub port: u16,
}

impl TestDb {
    pub fn new(test: &str) -> TestDb {
        TestDb::on(port(), test)
    }

    pub fn on(port: u16, test: &str) -> TestDb {
        let db = TestDb::bare_on(port, test);
        db.connect().batch_execute("CREATE EXTENSION quota_ext").unwrap();
        db.hot_if_asked();
        db
    }

    /// QUOTA_EXT_TEST_HOT_AFTER=N (scripts/test.sh runs the exactness suites again with 1):
    /// quota_ext.hot_after = N for the database, so that its windows turn hot (1: at their
    /// first consume) and the suites prove the hot path's guarantees as well.
    fn hot_if_asked(&self) {
        if let Ok(n) = std::env::var("QUOTA_EXT_TEST_HOT_AFTER") {
            let n: u32 = n.parse().expect("QUOTA_EXT_TEST_HOT_AFTER is a number");
            self.connect()
                .batch_execute(&format!(
                    "ALTER DATABASE {} SET quota_ext.hot_after = {n}",
                    self.name
                ))
                .unwrap();
        }
    }

    /// A new database without the extension.
    pub fn bare(test: &str) -> TestDb {
        TestDb::bare_on(port(), test)
    }

    fn bare_on(port: u16, test: &str) -> TestDb {
        let name = format!(
            "t_{}_{}_{}",
            test,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin = connect_on(port, "postgres");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        TestDb { name, port }
    }

    pub fn connect(&self) -> Client {
        connect_on(self.port, &self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping database {} for inspection", self.name);
            return;
        }
        let mut admin = connect_on(self.port, "postgres");
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

pub fn one_i64(c: &mut impl postgres::GenericClient, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

pub fn one_bool(c: &mut impl postgres::GenericClient, sql: &str) -> bool {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

pub fn one_text(c: &mut impl postgres::GenericClient, sql: &str) -> String {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// SQLSTATE of an error (or its text when it is not a server error).
pub fn code(e: &postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// SQLSTATE of a failed statement, or None when it succeeded.
pub fn sqlstate(c: &mut Client, sql: &str) -> Option<String> {
    match c.batch_execute(sql) {
        Ok(()) => None,
        Err(e) => Some(
            e.code()
                .map(|s| s.code().to_string())
                .unwrap_or_else(|| panic!("{sql}: not a server error: {e}")),
        ),
    }
}

/// The extension's tables, in the order of its install script.
pub const TABLES: [&str; 9] = [
    "plans",
    "limits",
    "subjects",
    "overrides",
    "usage",
    "idempotency_keys",
    "audit_log",
    "batches",
    "rate_policies",
];

/// Row counts of the quota tables a quota call writes, to show that a refused call changed
/// nothing (batch tests fingerprint quota.batches themselves; rate policies are written by
/// plain SQL only). Audit rows
/// of refusals arrive later from the audit writer (tests check them with settles_at), so
/// audit_log counts the rows of granted calls only.
pub fn table_counts(c: &mut Client) -> Vec<(String, i64)> {
    TABLES
        .iter()
        .filter(|t| !matches!(**t, "batches" | "rate_policies"))
        .map(|t| {
            (
                t.to_string(),
                one_i64(
                    c,
                    &if *t == "audit_log" {
                        "SELECT count(*) FROM quota.audit_log WHERE success".to_string()
                    } else {
                        format!("SELECT count(*) FROM quota.{t}")
                    },
                ),
            )
        })
        .collect()
}

/// Sum of usage, as text compared, so a changed value shows too.
pub fn usage_fingerprint(c: &mut Client) -> String {
    c.query_one(
        "SELECT coalesce(string_agg(format('%s/%s/%s/%s', subject, metric, period, used), ',' ORDER BY 1), '')
           FROM quota.usage",
        &[],
    )
    .unwrap()
    .get(0)
}

/// SQL giving every row of every table, whole, each table's rows in a fixed order. `columns`
/// replaces the expression of a table (its name, its expression) whose rows are to be compared
/// by some of their columns only.
pub fn data_fingerprint(columns: &[(&str, &str)]) -> String {
    let parts: Vec<String> = TABLES
        .iter()
        .map(|t| match columns.iter().find(|(name, _)| name == t) {
            Some((_, expression)) => expression.to_string(),
            None if *t == "audit_log" => {
                "(SELECT string_agg(t::text, ',' ORDER BY t.id) FROM quota.audit_log t)".to_string()
            }
            None => format!("(SELECT string_agg(t::text, ',' ORDER BY t::text) FROM quota.{t} t)"),
        })
        .collect();
    format!("\nSELECT concat_ws(E'\\n',\n  {})", parts.join(",\n  "))
}

/// The extension's schema as the catalogs describe it, one line an object: every relation,
/// column (with its position, type, nullability and default), index, constraint, function
/// definition, trigger, policy, type, privilege, extension membership and what pg_dump dumps of
/// the data (pg_dump --schema-only prints only `CREATE EXTENSION` for an extension's objects).
pub const SCHEMA_FINGERPRINT: &str = "
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

/// Audit rows of refusals that raise are written by the audit writer, not by the caller's
/// transaction: poll `sql` (one bigint) until it gives `expected` (at most 30 s), then check
/// it stays there a moment, so rows written twice or late would show. Returns the last value.
pub fn settles_at(c: &mut Client, sql: &str, expected: i64) -> i64 {
    let mut got = poll(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(50),
        || one_i64(c, sql),
        |got| *got == expected,
    );
    if got == expected {
        std::thread::sleep(std::time::Duration::from_millis(1200));
        got = one_i64(c, sql);
    }
    got
}

/// Asserts that `sql` (one bigint) settles at `expected`, as settles_at waits for it.
#[track_caller]
pub fn assert_settles(c: &mut Client, sql: &str, expected: i64) {
    assert_eq!(settles_at(c, sql, expected), expected);
}

/// SQL counting the rows of quota.audit_log that match `filter`.
pub fn audit_count(filter: &str) -> String {
    format!("SELECT count(*) FROM quota.audit_log WHERE {filter}")
}

/// How many rows of quota.audit_log match `filter`.
pub fn audit_rows(c: &mut Client, filter: &str) -> i64 {
    one_i64(c, &audit_count(filter))
}

/// Call `probe` every `every` until `done` holds for what it returns or `within` has passed,
/// and return what it returned last.
pub fn poll<T>(
    within: std::time::Duration,
    every: std::time::Duration,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        let got = probe();
        if done(&got) || std::time::Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(every);
    }
}

/// One of the server's counters from quota.metrics().
pub fn metric(c: &mut Client, name: &str) -> i64 {
    one_i64(
        c,
        &format!("SELECT value FROM quota.metrics() WHERE name = '{name}'"),
    )
}

/// A new batch of `owner`'s `item`; returns its id.
pub fn new_batch(c: &mut Client, owner: &str, item: &str, quantity: i64) -> String {
    one_text(
        c,
        &format!("SELECT id::text FROM quota.create_batch('{owner}', '{item}', {quantity})"),
    )
}

/// SQL that creates `role` (once per server) as an application role that is not trusted: it may
/// call every function of the extension and has no other privilege.
pub fn untrusted_role_sql(role: &str) -> String {
    format!(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                 CREATE ROLE {role} NOLOGIN;
             END IF;
         END $$;
         GRANT USAGE ON SCHEMA quota TO {role};
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA quota TO {role};"
    )
}

/// Runs `f` as the session's own user (a superuser) and switches back to `role` afterwards:
/// what an untrusted role cannot read, such as the row counts of the tables.
pub fn as_session_user<T>(c: &mut Client, role: &str, f: impl FnOnce(&mut Client) -> T) -> T {
    c.batch_execute("RESET ROLE").unwrap();
    let out = f(c);
    c.batch_execute(&format!("SET ROLE {role}")).unwrap();
    out
}

/// Switches the session to `role` with JWT claims set for the session, as a connection that
/// serves one user at a time (not PostgREST's per-transaction settings) holds them.
pub fn as_role_with_claims(c: &mut Client, role: &str, claims: &str) {
    c.batch_execute(&format!(
        "RESET ROLE; SELECT set_config('request.jwt.claims', '{claims}', false); SET ROLE {role}"
    ))
    .unwrap();
}

/// What an application puts in a database, through calls every version since 0.1.0 has: limits
/// on two plans and two periods, a subject on `plan` in its own time zone, an override, usage
/// with an idempotency key and a refund, a batch consumed once, a rate policy on `plan`.
/// Returns the batch's id. The upgrade and backup tests fill their databases with it and check
/// with `goes_on` that everything continues afterwards.
pub fn fill(c: &mut Client, plan: &str) -> String {
    c.batch_execute(&format!(
        "SELECT quota.set_limit('free', 'api', 'day', 10);
         SELECT quota.set_limit('free', 'api', 'month', 100);
         SELECT quota.set_limit('{plan}', 'api', 'day', 1000);
         SELECT quota.set_plan('tokyo', '{plan}', 'Asia/Tokyo');
         SELECT quota.set_override('vip', 'api', 'day', 50);
         SELECT quota.consume('ann', 'api', 3, 'order-1');
         SELECT quota.consume('ann', 'api', 20);
         SELECT quota.refund('ann', 'api');
         SELECT quota.consume('tokyo', 'api', 5);
         SELECT quota.consume('vip', 'api', 7);
         SELECT quota.create_batch('shop', 'milk', 10, now() + interval '3 days');
         INSERT INTO quota.rate_policies VALUES ('exports', '{plan}', 5, '1 hour', NULL, false);"
    ))
    .unwrap();
    let batch = one_text(c, "SELECT id::text FROM quota.batches");
    c.batch_execute(&format!("SELECT quota.consume_batch_quantity('{batch}', 4)"))
        .unwrap();
    batch
}

/// A database filled by `fill` goes on from where it was: the idempotency key replays, usage
/// continues, the subject's plan and the override apply, the batch's version continues.
pub fn goes_on(c: &mut Client, batch: &str) {
    let r = c
        .query_one(
            "SELECT replayed, used FROM quota.consume('ann', 'api', 3, 'order-1')",
            &[],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, bool>(0), r.get::<_, i64>(1)),
        (true, 3),
        "the idempotency key replays"
    );
    let used = one_i64(c, "SELECT used FROM quota.consume('ann', 'api')");
    assert_eq!(used, 3, "usage continues: 3 - 1 refunded + 1");
    let limits = one_text(
        c,
        "SELECT string_agg(format('%s:%s', subject, quota_limit), ',' ORDER BY subject)
           FROM (SELECT (quota.status(s)).* FROM unnest(ARRAY['tokyo', 'vip']) s) d
          WHERE period = 'day'",
    );
    assert_eq!(limits, "tokyo:1000,vip:50", "plans and overrides apply");
    let version = one_i64(
        c,
        &format!("SELECT version FROM quota.consume_batch_quantity('{batch}', 1)"),
    );
    assert_eq!(version, 3, "the batch's version continues");
}

/// Run `n` sessions at once, each on a connection of its own to `db`, and collect what each
/// returns (in session order). `session(i, client, start)` gets its number and its connection,
/// prepares what it needs, and calls `start()` when ready: every session waits there until all
/// are, so that the work itself overlaps as much as possible.
pub fn in_parallel<T, F>(db: &TestDb, n: usize, session: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, &mut Client, &dyn Fn()) -> T + Send + Sync + 'static,
{
    in_parallel_with(n, || db.connect(), session)
}

/// in_parallel on connections that `connect` makes (to another server, through a pooler).
pub fn in_parallel_with<T, F>(n: usize, connect: impl Fn() -> Client, session: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, &mut Client, &dyn Fn()) -> T + Send + Sync + 'static,
{
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let session = std::sync::Arc::new(session);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let mut c = connect();
            let (barrier, session) = (barrier.clone(), session.clone());
            std::thread::spawn(move || {
                let start = || {
                    barrier.wait();
                };
                session(i, &mut c, &start)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
