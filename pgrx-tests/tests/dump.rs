//! Backups: pg_dump of a database using quota_ext and pg_restore into an empty one bring back
//! every row of every quota table (edited shipped rows included), and the restored database goes
//! on where the dumped one stopped: idempotency keys replay, usage continues, audit ids do not
//! collide, batches keep their versions, edited rate policies apply.

use quota_ext_itests::{
    data_fingerprint, env_port, fill, goes_on, one_i64, one_text, port, sqlstate, TestDb,
};
use std::path::PathBuf;
use std::process::Command;

fn pg_tool(tool: &str) -> Command {
    let bin = std::env::var("QUOTA_EXT_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let mut c = Command::new(PathBuf::from(bin).join(tool));
    c.args(["-h", "127.0.0.1", "-p", &port().to_string(), "-U", "postgres"]);
    c
}

fn run(mut c: Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_dump_restores_every_row_and_the_restored_database_goes_on() {
    let _ = env_port("QUOTA_EXT_TEST_PORT");
    let src = TestDb::new("dump_src");
    let mut c = src.connect();
    c.batch_execute(
        "INSERT INTO quota.plans VALUES ('gold', 'Gold customers');
         UPDATE quota.plans SET description = 'Paid plan, billed monthly' WHERE plan = 'pro';
         UPDATE quota.rate_policies SET rate = 30 WHERE policy = 'default' AND plan = 'anonymous';
         INSERT INTO quota.rate_policies VALUES ('exports', 'pro', 2, '1 hour', 2, true);",
    )
    .unwrap();
    let batch = fill(&mut c, "gold");
    c.batch_execute("UPDATE quota.subjects SET metadata = '{\"stripe\": \"cus_1\"}' WHERE subject = 'tokyo'")
        .unwrap();
    let before = one_text(&mut c, &data_fingerprint(&[]));
    let max_id = one_i64(&mut c, "SELECT max(id) FROM quota.audit_log");

    // A plain dump carries the rows (not only CREATE EXTENSION) ...
    let mut plain = pg_tool("pg_dump");
    plain.arg(&src.name);
    let sql = run(plain);
    for table in [
        "plans",
        "limits",
        "usage",
        "audit_log",
        "batches",
        "rate_policies",
    ] {
        assert!(
            sql.contains(&format!("COPY quota.{table} ")),
            "no data of quota.{table} in the dump"
        );
    }
    // ... and a custom-format dump restores into an empty database.
    let file = std::env::temp_dir().join(format!("quota_ext_dump_{}.dump", std::process::id()));
    let mut dump = pg_tool("pg_dump");
    dump.args(["-Fc", "-f"]).arg(&file).arg(&src.name);
    run(dump);
    let dst = TestDb::bare("dump_dst");
    let mut restore = pg_tool("pg_restore");
    restore.args(["--exit-on-error", "-d", &dst.name]).arg(&file);
    run(restore);
    let _ = std::fs::remove_file(&file);

    let mut r = dst.connect();
    assert_eq!(
        one_text(&mut r, &data_fingerprint(&[])),
        before,
        "the restore lost or changed rows"
    );

    // It goes on from where the dumped database was.
    goes_on(&mut r, &batch);
    assert!(
        one_i64(&mut r, "SELECT max(id) FROM quota.audit_log") > max_id,
        "new audit rows get new ids"
    );
    assert_eq!(
        one_i64(&mut r, "SELECT rate_limit FROM quota.rate_limit('default', 'k1')"),
        30,
        "the edited shipped policy applies"
    );
}

#[test]
fn only_an_untouched_shipped_row_is_replaced_by_an_insert_of_its_key() {
    let db = TestDb::new("dump_seed");
    let mut c = db.connect();
    // Untouched: the insert replaces it (this is what a restore does after CREATE EXTENSION).
    c.batch_execute(
        "INSERT INTO quota.plans VALUES ('free', 'Free tier');
         INSERT INTO quota.rate_policies VALUES ('default', 'pro', 2000, '1 minute', NULL, false);",
    )
    .unwrap();
    assert_eq!(
        one_text(&mut c, "SELECT description FROM quota.plans WHERE plan = 'free'"),
        "Free tier"
    );
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT rate FROM quota.rate_policies WHERE (policy, plan) = ('default', 'pro')"
        ),
        2000
    );
    assert_eq!(one_i64(&mut c, "SELECT count(*) FROM quota.plans"), 4);
    // Edited (as just now), or not shipped: the key conflicts as usual.
    for sql in [
        "INSERT INTO quota.plans VALUES ('free', 'again')",
        "INSERT INTO quota.rate_policies VALUES ('default', 'pro', 1, '1 minute', NULL, false)",
        "INSERT INTO quota.plans VALUES ('gold', 'Gold'); INSERT INTO quota.plans VALUES ('gold', 'Gold')",
    ] {
        assert_eq!(sqlstate(&mut c, sql).as_deref(), Some("23505"), "{sql}");
    }
    // ON CONFLICT on a table with the trigger still sees the conflict of an edited row.
    c.batch_execute("INSERT INTO quota.plans VALUES ('free', 'x') ON CONFLICT (plan) DO NOTHING")
        .unwrap();
    assert_eq!(
        one_text(&mut c, "SELECT description FROM quota.plans WHERE plan = 'free'"),
        "Free tier"
    );
}
