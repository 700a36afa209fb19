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
        db
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

pub fn one_i64(c: &mut Client, sql: &str) -> i64 {
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

/// Row counts of the quota tables a quota call writes, to show that a refused call changed
/// nothing (batch tests fingerprint quota.batches themselves; rate policies are written by
/// plain SQL only). Audit rows
/// of refusals arrive later from the audit writer (tests check them with settles_at), so
/// audit_log counts the rows of granted calls only.
pub fn table_counts(c: &mut Client) -> Vec<(String, i64)> {
    let tables = [
        "plans",
        "limits",
        "subjects",
        "overrides",
        "usage",
        "idempotency_keys",
        "audit_log",
    ];
    tables
        .iter()
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

/// Audit rows of refusals that raise are written by the audit writer, not by the caller's
/// transaction: poll `sql` (one bigint) until it gives `expected` (at most 30 s), then check
/// it stays there a moment, so rows written twice or late would show. Returns the last value.
pub fn settles_at(c: &mut Client, sql: &str, expected: i64) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut got = one_i64(c, sql);
    while got != expected && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        got = one_i64(c, sql);
    }
    if got == expected {
        std::thread::sleep(std::time::Duration::from_millis(1200));
        got = one_i64(c, sql);
    }
    got
}
