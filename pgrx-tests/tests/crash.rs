//! SIGKILL of one backend while eight sessions consume: the postmaster restarts every backend
//! and re-creates shared memory by itself; every consume a client saw committed is in usage and
//! in the audit log, and the shared-memory features work again. Runs on a server of its own
//! (QUOTA_EXT_CRASH_PORT): the restart would break tests running beside it.

use postgres::{Client, NoTls};
use quota_ext_itests::{assert_settles, audit_count, audit_rows, metric, new_batch, one_bool, one_i64};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Whether the one call a bucket of 'crash:key' allows an hour passes.
fn key_allowed(c: &mut Client) -> bool {
    one_bool(
        c,
        "SELECT allowed FROM quota.rate_check('crash:key', 1, '1 hour')",
    )
}

fn upstream_allowed(c: &mut Client) -> bool {
    c.query_one("SELECT allowed FROM quota.upstream_acquire('crash-api')", &[])
        .unwrap()
        .get(0)
}

fn breaker_allowed(c: &mut Client) -> bool {
    c.query_one("SELECT allowed FROM quota.breaker_allow('crash-breaker')", &[])
        .unwrap()
        .get(0)
}

fn connect(port: u16, db: &str) -> Result<Client, postgres::Error> {
    Client::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname={db} application_name=crash-client"),
        NoTls,
    )
}

#[test]
#[ignore = "needs a server of its own: scripts/test.sh runs it with --ignored"]
fn sigkill_of_a_backend_loses_no_acknowledged_consume() {
    let port = quota_ext_itests::env_port("QUOTA_EXT_CRASH_PORT");
    let mut admin = connect(port, "postgres").unwrap();
    admin
        .batch_execute("DROP DATABASE IF EXISTS crash WITH (FORCE)")
        .unwrap();
    admin.batch_execute("CREATE DATABASE crash").unwrap();
    let mut c = connect(port, "crash").unwrap();
    c.batch_execute("CREATE EXTENSION quota_ext; SELECT quota.set_limit('free', 'api', 'day', 1000000000)")
        .unwrap();
    let metrics_before = metric(&mut c, "consumes");
    assert!(metrics_before >= 0);

    let spent = key_allowed(&mut c);
    assert!(spent);
    // A breaker opened before the crash (its state is in shared memory too).
    c.batch_execute(
        "INSERT INTO quota.breakers (name, failure_threshold) VALUES ('crash-breaker', 1);
         SELECT quota.breaker_record('crash-breaker', false);",
    )
    .unwrap();
    assert!(!breaker_allowed(&mut c), "open before the crash");
    // An upstream budget spent before the crash (shared memory too).
    c.batch_execute("SELECT quota.upstream_observe('crash-api', 10, 1, now() + interval '1 hour'); SELECT quota.upstream_acquire('crash-api');")
        .unwrap();
    assert!(!upstream_allowed(&mut c), "spent before the crash");

    const SESSIONS: usize = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut c = connect(port, "crash").unwrap();
                let stmt = c
                    .prepare(&format!("SELECT allowed FROM quota.consume('s{i}', 'api')"))
                    .unwrap();
                // Rate checks run beside the consumes, on the shared-memory table the crash resets.
                let rate = c
                    .prepare(&format!(
                        "SELECT allowed FROM quota.rate_check('crash:s{i}', 1000000, '1 second')"
                    ))
                    .unwrap();
                let mut acknowledged = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    match c.query_one(&stmt, &[]) {
                        Ok(r) if r.get::<_, bool>(0) => acknowledged += 1,
                        Ok(_) => panic!("denied under a limit of a billion"),
                        Err(_) => break, // the crash ended this session
                    }
                    if c.query_one(&rate, &[]).is_err() {
                        break;
                    }
                }
                acknowledged
            })
        })
        .collect();

    thread::sleep(Duration::from_millis(1500));
    let victim: i32 = c
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'crash-client' AND datname = 'crash'
               AND pid <> pg_backend_pid() ORDER BY pid LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let killed = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -9 {victim}");
    let acknowledged: Vec<i64> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    assert!(
        acknowledged.iter().all(|&n| n > 0),
        "every session got work done before the crash: {acknowledged:?}"
    );

    // The server restarts by itself.
    let mut c = wait_for_server(port, "crash");
    for (i, acked) in acknowledged.iter().enumerate() {
        let used: i64 = c
            .query_opt(
                &format!("SELECT used FROM quota.usage_totals WHERE subject = 's{i}'"),
                &[],
            )
            .unwrap()
            .map_or(0, |r| r.get(0));
        let audited = audit_rows(
            &mut c,
            &format!("subject = 's{i}' AND action = 'consume' AND success"),
        );
        // A call can commit and crash before its answer reaches the client: at most one.
        assert!(
            used >= *acked && used <= acked + 1,
            "s{i}: {acked} acknowledged, {used} in usage"
        );
        assert_eq!(audited, used, "s{i}: usage and audit commit together");
    }
    // Shared memory was re-created: buckets start empty (the spent one is full again) and the
    // bucket table works.
    assert!(
        key_allowed(&mut c),
        "a bucket spent before the crash is full after it"
    );
    assert!(!key_allowed(&mut c), "and works: the next call is denied");
    // The breaker table was re-created: the breaker is closed again, and works.
    assert!(breaker_allowed(&mut c), "a breaker starts closed after the crash");
    c.batch_execute("SELECT quota.breaker_record('crash-breaker', false)")
        .unwrap();
    assert!(!breaker_allowed(&mut c), "and opens again");
    // The budgets were re-created empty: nothing is known of the API until it is observed again.
    assert!(
        upstream_allowed(&mut c),
        "an unknown budget limits nothing after the crash"
    );
    c.batch_execute("SELECT quota.upstream_observe('crash-api', 10, 0, now() + interval '1 hour')")
        .unwrap();
    assert!(!upstream_allowed(&mut c), "and works once observed");
    // Shared memory was re-created: the counters work, from zero.
    let consumes = metric(&mut c, "consumes");
    c.batch_execute("SELECT quota.consume('after', 'api')").unwrap();
    let after = metric(&mut c, "consumes");
    assert_eq!(after, consumes + 1);
    // The audit queue and its writer slots were re-created too: a refusal is audited again.
    let batch = new_batch(&mut c, "after", "milk", 1);
    let refused = c
        .batch_execute(&format!("SELECT quota.consume_batch_quantity('{batch}', 2)"))
        .unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("23514"));
    assert_settles(&mut c, &audit_count("subject = 'after' AND NOT success"), 1);
}

/// How the hot-window crash tests end the server's life under load.
#[derive(Clone, Copy, Debug)]
enum Crash {
    /// SIGKILL of one backend: the postmaster restarts every backend and re-creates shared
    /// memory by itself.
    KillBackend,
    /// `pg_ctl -m immediate stop` (no shutdown checkpoint: recovery replays the WAL), then a
    /// start (QUOTA_EXT_CRASH_CTL, scripts/crash_ctl.sh, runs pg_ctl for the crash server).
    Immediate,
    /// A synchronous hot standby taken before the load, the server stopped immediately under
    /// it, the standby promoted and charged from then on (a failover).
    Failover,
}

fn wait_for_server(port: u16, db: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = connect(port, db) {
            if c.simple_query("SELECT 1").is_ok() {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the server did not come back within 60 s"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn crash_ctl(args: &[&str]) {
    let ctl = std::env::var("QUOTA_EXT_CRASH_CTL").expect("QUOTA_EXT_CRASH_CTL (scripts/test.sh sets it)");
    let status = std::process::Command::new(&ctl).args(args).status().unwrap();
    assert!(status.success(), "{ctl} {args:?}");
}

/// Eight sessions charge one hot window (every consume after the first is hot: hot_after = 1)
/// until the server goes down under them; after it is back, the window's usage (row plus
/// stripes) is every grant whose transaction committed, which the audit rows count too (each
/// in its grant's transaction), and the shared count is rebuilt from them: exactly the limit's
/// rest can be granted afterwards, by eight sessions at once.
fn a_hot_window_survives(how: Crash) {
    let port = quota_ext_itests::env_port("QUOTA_EXT_CRASH_PORT");
    let db = format!("crash_hot_{how:?}").to_lowercase();
    let mut admin = connect(port, "postgres").unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    admin
        .batch_execute(&format!("ALTER DATABASE {db} SET quota_ext.hot_after = 1"))
        .unwrap();
    let mut c = connect(port, &db).unwrap();
    c.batch_execute(
        "CREATE EXTENSION quota_ext; SELECT quota.set_limit('free', 'api', 'total', 1000000000);
         SELECT quota.consume('hot', 'api');",
    )
    .unwrap();
    let standby_port = quota_ext_itests::env_port("QUOTA_EXT_CRASH_STANDBY_PORT");
    if let Crash::Failover = how {
        crash_ctl(&["standby-create", &standby_port.to_string()]);
    }

    const SESSIONS: usize = 8;
    let clients: Vec<_> = (0..SESSIONS)
        .map(|_| {
            let db = db.clone();
            thread::spawn(move || {
                let mut c = connect(port, &db).unwrap();
                let stmt = c
                    .prepare("SELECT allowed FROM quota.consume('hot', 'api')")
                    .unwrap();
                let mut acknowledged = 0i64;
                loop {
                    match c.query_one(&stmt, &[]) {
                        Ok(r) if r.get::<_, bool>(0) => acknowledged += 1,
                        Ok(_) => panic!("denied under a limit of a billion"),
                        Err(_) => break, // the crash ended this session
                    }
                }
                acknowledged
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(1500));
    let stripes = one_bool(
        &mut c,
        "SELECT count(*) > 1 FROM quota.usage_stripes WHERE subject = 'hot'",
    );
    assert!(stripes, "the sessions charge the window on the hot path");
    match how {
        Crash::KillBackend => {
            let victim: i32 = c
                .query_one(
                    &format!(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = 'crash-client'
                           AND datname = '{db}' AND pid <> pg_backend_pid() ORDER BY pid LIMIT 1"
                    ),
                    &[],
                )
                .unwrap()
                .get(0);
            let killed = std::process::Command::new("kill")
                .args(["-9", &victim.to_string()])
                .status()
                .unwrap();
            assert!(killed.success(), "kill -9 {victim}");
        }
        Crash::Immediate | Crash::Failover => crash_ctl(&["-m", "immediate", "stop"]),
    }
    let acknowledged: i64 = clients.into_iter().map(|h| h.join().unwrap()).sum::<i64>() + 1;
    let port = match how {
        Crash::KillBackend => port,
        Crash::Immediate => {
            crash_ctl(&["-w", "start"]);
            port
        }
        Crash::Failover => {
            crash_ctl(&["standby", "-w", "promote"]);
            standby_port
        }
    };
    let mut c = wait_for_server(port, &db);
    if let Crash::Failover = how {
        assert!(
            !one_bool(&mut c, "SELECT pg_is_in_recovery()"),
            "the standby took over"
        );
    }
    let used = one_i64(
        &mut c,
        "SELECT used FROM quota.usage_totals WHERE subject = 'hot'",
    );
    let audited = audit_rows(&mut c, "subject = 'hot' AND action = 'consume' AND success");
    // A call can commit and go down before its answer reaches the client: at most one per
    // session.
    assert!(
        used >= acknowledged && used <= acknowledged + SESSIONS as i64,
        "{how:?}: {acknowledged} acknowledged, {used} in usage"
    );
    assert_eq!(audited, used, "{how:?}: usage and audit commit together");

    // The shared count starts again from the rows: exactly the rest of the limit is granted.
    c.batch_execute(&format!(
        "SELECT quota.set_limit('free', 'api', 'total', {})",
        used + 300
    ))
    .unwrap();
    let granted: Vec<i64> = (0..SESSIONS)
        .map(|_| {
            let db = db.clone();
            thread::spawn(move || {
                let mut c = connect(port, &db).unwrap();
                (0..60)
                    .map(|_| one_bool(&mut c, "SELECT allowed FROM quota.consume('hot', 'api')") as i64)
                    .sum()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(
        granted.iter().sum::<i64>(),
        300,
        "{how:?}: exactly the rest after the restart"
    );
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT used FROM quota.usage_totals WHERE subject = 'hot'"
        ),
        used + 300
    );
    assert_eq!(
        audit_rows(&mut c, "subject = 'hot' AND action = 'consume' AND success"),
        used + 300
    );
    drop(c);
    admin = connect(port, "postgres").unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .unwrap();
    if let Crash::Failover = how {
        // The old primary back, for what runs after.
        crash_ctl(&["standby-drop"]);
    }
}

#[test]
#[ignore = "needs a server of its own: scripts/test.sh runs it with --ignored"]
fn sigkill_of_a_backend_on_a_hot_window_loses_no_grant_and_rebuilds_the_count() {
    a_hot_window_survives(Crash::KillBackend);
}

#[test]
#[ignore = "needs a server of its own: scripts/test.sh runs it with --ignored"]
fn an_immediate_shutdown_under_load_on_a_hot_window_loses_no_grant() {
    a_hot_window_survives(Crash::Immediate);
}

#[test]
#[ignore = "needs a server of its own: scripts/test.sh runs it with --ignored"]
fn a_failover_under_load_on_a_hot_window_loses_no_grant() {
    a_hot_window_survives(Crash::Failover);
}
