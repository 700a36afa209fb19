//! Inventory batches under real concurrency: exact totals, one winner per expected version, and
//! no deadlock between callers whose batch sets overlap.

use postgres::Client;
use quota_ext_itests::{code, connect_on, in_parallel, one_i64, settles_at, sqlstate, TestDb};
use rand::Rng;
use std::thread;

const SESSIONS: usize = 8;

#[test]
fn eight_sessions_drain_a_batch_exactly() {
    let db = TestDb::new("drain");
    let mut c = db.connect();
    let id: String = c
        .query_one(
            "SELECT id::text FROM quota.create_batch('shop', 'milk', 1000)",
            &[],
        )
        .unwrap()
        .get(0);
    let handles = {
        let id = id.clone();
        in_parallel(&db, SESSIONS, move |_, c, start| {
            let stmt = c
                .prepare("SELECT consumed FROM quota.consume_batch_quantity($1::text::uuid, 1)")
                .unwrap();
            start();
            let (mut taken, mut other) = (0i64, Vec::new());
            loop {
                match c.query_one(&stmt, &[&id]) {
                    Ok(row) => taken += row.get::<_, i64>(0),
                    Err(e) if code(&e) == "23514" => break,
                    Err(e) => {
                        other.push(code(&e));
                        break;
                    }
                }
            }
            (taken, other)
        })
    };
    let mut total = 0;
    for h in handles {
        let (taken, other) = h;
        assert!(
            other.is_empty(),
            "errors other than insufficient quantity: {other:?}"
        );
        total += taken;
    }
    assert_eq!(total, 1000);
    let state = c
        .query_one(
            "SELECT quantity, version FROM quota.batches WHERE id = $1::text::uuid",
            &[&id],
        )
        .unwrap();
    assert_eq!((state.get::<_, i64>(0), state.get::<_, i64>(1)), (0, 1001));
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT count(*) FROM quota.audit_log WHERE action = 'consume_batch' AND success"
        ),
        1000
    );
    // Each session stopped at its first refusal: eight refusals, eight audit rows, written by
    // the audit writer although each refusal rolled its caller's transaction back.
    assert_eq!(
        settles_at(
            &mut c,
            "SELECT count(*) FROM quota.audit_log
              WHERE action = 'consume_batch' AND NOT success AND reason = 'insufficient_quantity'
                AND details->>'available' = '0' AND amount = 1",
            SESSIONS as i64
        ),
        SESSIONS as i64
    );
}

#[test]
fn one_expected_version_has_one_winner() {
    let db = TestDb::new("version");
    let mut c = db.connect();
    let id: String = c
        .query_one(
            "SELECT id::text FROM quota.create_batch('shop', 'milk', 100)",
            &[],
        )
        .unwrap()
        .get(0);
    let handles = {
        let id = id.clone();
        in_parallel(&db, SESSIONS, move |_, c, start| {
            start();
            c.query_one(
                "SELECT version FROM quota.consume_batch_quantity($1::text::uuid, 1, 1)",
                &[&id],
            )
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| code(&e))
        })
    };
    let results: Vec<_> = handles.into_iter().collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r == &Ok(2) || r == &Err("40001".to_string())),
        "{results:?}"
    );
    assert_eq!(one_i64(&mut c, "SELECT quantity FROM quota.batches"), 99);
    // One audit row per refused session, with the versions it expected and found.
    assert_eq!(
        settles_at(
            &mut c,
            "SELECT count(*) FROM quota.audit_log
              WHERE NOT success AND reason = 'version_conflict'
                AND details->>'expected_version' = '1' AND details->>'version' = '2'",
            SESSIONS as i64 - 1
        ),
        SESSIONS as i64 - 1
    );
}

/// Sessions with opposite orders (fefo and fifo over batches whose expiry order is the reverse
/// of their age) would deadlock under naive locking.
#[test]
fn overlapping_consume_item_callers_never_deadlock_and_stay_exact() {
    let db = TestDb::new("items");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.create_batch('shop', 'flour', 100, now() + make_interval(days => 10 - n))
           FROM generate_series(1, 5) n;
         UPDATE quota.batches SET created_at = now() - make_interval(hours => expires_at::date - now()::date);
         SELECT quota.create_batch('shop', 'milk', 100, now() + make_interval(days => n)) FROM generate_series(1, 5) n;",
    )
    .unwrap();
    // The batch that expires first is the newest: fefo and fifo lock in opposite orders.
    let fefo_first: String = c
        .query_one(
            "SELECT id::text FROM quota.batches WHERE item = 'flour' ORDER BY expires_at LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let fifo_first: String = c
        .query_one(
            "SELECT id::text FROM quota.batches WHERE item = 'flour' ORDER BY created_at LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let last_fifo: String = c
        .query_one(
            "SELECT id::text FROM quota.batches WHERE item = 'flour' ORDER BY created_at DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(fefo_first, last_fifo);
    assert_ne!(fefo_first, fifo_first);
    let handles = in_parallel(&db, SESSIONS, move |i, c, start| {
        let (mut flour, mut milk, mut refused, mut other) = (0i64, 0i64, 0i64, Vec::new());
        let strategy = if i % 2 == 0 { "fefo" } else { "fifo" };
        start();
        for _ in 0..40 {
            let n: i64 = rand::thread_rng().gen_range(1..=5);
            match c.query_one(
                "SELECT sum(consumed)::bigint FROM quota.consume_item('shop', 'flour', $1, $2)",
                &[&n, &strategy],
            ) {
                Ok(r) => flour += r.get::<_, i64>(0),
                Err(e) if code(&e) == "23514" => refused += 1,
                Err(e) => other.push(code(&e)),
            }
            match c.query_one(
                "SELECT sum(consumed)::bigint FROM quota.consume_item('shop', 'milk', $1)",
                &[&n],
            ) {
                Ok(r) => milk += r.get::<_, i64>(0),
                Err(e) if code(&e) == "23514" => refused += 1,
                Err(e) => other.push(code(&e)),
            }
        }
        (flour, milk, refused, other)
    });
    let (mut flour, mut milk, mut refusals) = (0, 0, 0);
    for h in handles {
        let (f, m, r, other) = h;
        refusals += r;
        assert!(
            other.is_empty(),
            "errors other than insufficient quantity (40P01 = deadlock): {other:?}"
        );
        flour += f;
        milk += m;
    }
    assert_eq!(
        flour,
        500 - one_i64(
            &mut c,
            "SELECT sum(quantity)::bigint FROM quota.batches WHERE item = 'flour'"
        )
    );
    assert_eq!(
        milk,
        500 - one_i64(
            &mut c,
            "SELECT sum(quantity)::bigint FROM quota.batches WHERE item = 'milk'"
        )
    );
    assert!(flour > 0 && milk > 0);
    // FEFO: in expiry order, empty batches, then at most one partly used, then full ones.
    let q: Vec<i64> = c
        .query(
            "SELECT quantity FROM quota.batches WHERE item = 'milk' ORDER BY expires_at",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let first_not_empty = q.iter().position(|&x| x > 0).unwrap_or(q.len());
    assert!(
        q[first_not_empty.min(q.len())..]
            .iter()
            .skip(1)
            .all(|&x| x == 100),
        "not FEFO: {q:?}"
    );
    // One audit row per successful call.
    let calls = one_i64(
        &mut c,
        "SELECT count(*) FROM quota.audit_log WHERE action = 'consume_item' AND success",
    );
    let summed = one_i64(
        &mut c,
        "SELECT coalesce(sum(amount), 0)::bigint FROM quota.audit_log WHERE action = 'consume_item' AND success",
    );
    assert!(calls > 0);
    assert_eq!(summed, flour + milk);
    // And one per refusal, written by the audit writer.
    assert!(refusals > 0, "the test drains both items");
    assert_eq!(
        settles_at(
            &mut c,
            "SELECT count(*) FROM quota.audit_log WHERE action = 'consume_item' AND NOT success",
            refusals
        ),
        refusals
    );
}

#[test]
fn authenticated_callers_consume_only_their_own_batches() {
    let db = TestDb::new("batch_owner");
    let mut c = db.connect();
    c.batch_execute(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'quota_app_user') THEN
                 CREATE ROLE quota_app_user NOLOGIN;
             END IF;
         END $$;
         GRANT USAGE ON SCHEMA quota TO quota_app_user;
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA quota TO quota_app_user;",
    )
    .unwrap();
    let mine: String = c
        .query_one(
            "SELECT id::text FROM quota.create_batch('user-1', 'milk', 10)",
            &[],
        )
        .unwrap()
        .get(0);
    let theirs: String = c
        .query_one(
            "SELECT id::text FROM quota.create_batch('user-2', 'milk', 10)",
            &[],
        )
        .unwrap()
        .get(0);
    c.batch_execute(
        "SET ROLE quota_app_user; SELECT set_config('request.jwt.claims', '{\"sub\":\"user-1\"}', false)",
    )
    .unwrap();
    let err = |c: &mut postgres::Client, sql: &str| c.batch_execute(sql).err().map(|e| code(&e));
    assert_eq!(
        err(
            &mut c,
            &format!("SELECT quota.consume_batch_quantity('{theirs}', 1)")
        )
        .as_deref(),
        Some("42501")
    );
    assert_eq!(
        err(&mut c, "SELECT quota.consume_item('user-2', 'milk', 1)").as_deref(),
        Some("42501")
    );
    assert_eq!(
        err(&mut c, "SELECT quota.create_batch('user-1', 'milk', 1)").as_deref(),
        Some("42501")
    );
    assert_eq!(
        err(
            &mut c,
            &format!("SELECT quota.consume_batch_quantity('{mine}', 1)")
        ),
        None
    );
    assert_eq!(
        err(&mut c, "SELECT quota.consume_item('user-1', 'milk', 2)"),
        None
    );
    c.batch_execute("RESET ROLE").unwrap();
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT sum(quantity)::bigint FROM quota.batches WHERE owner = 'user-1'"
        ),
        7
    );
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT sum(quantity)::bigint FROM quota.batches WHERE owner = 'user-2'"
        ),
        10
    );
}

#[test]
fn batch_refusals_have_their_own_sqlstate_and_change_nothing() {
    let db = TestDb::new("batch_bad");
    let mut c = db.connect();
    let id: String = c
        .query_one("SELECT id::text FROM quota.create_batch('shop', 'milk', 5)", &[])
        .unwrap()
        .get(0);
    let cases = [
        (
            "SELECT quota.consume_batch_quantity('00000000-0000-0000-0000-000000000000', 1)".to_string(),
            "P0002",
        ),
        (format!("SELECT quota.consume_batch_quantity('{id}', 0)"), "22023"),
        (
            format!("SELECT quota.consume_batch_quantity('{id}', -3)"),
            "22023",
        ),
        (
            format!("SELECT quota.consume_batch_quantity('{id}', NULL)"),
            "22004",
        ),
        (format!("SELECT quota.consume_batch_quantity('{id}', 6)"), "23514"),
        (
            format!("SELECT quota.consume_batch_quantity('{id}', 1, 7)"),
            "40001",
        ),
        (
            "SELECT quota.consume_item('shop', 'milk', 6)".to_string(),
            "23514",
        ),
        (
            "SELECT quota.consume_item('shop', 'milk', 0)".to_string(),
            "22023",
        ),
        (
            "SELECT quota.consume_item('shop', 'milk', 1, 'lifo')".to_string(),
            "22023",
        ),
        ("SELECT quota.consume_item('shop', '', 1)".to_string(), "22023"),
        (
            "SELECT quota.create_batch('shop', 'milk', -1)".to_string(),
            "22023",
        ),
    ];
    // Refusals' audit rows arrive on their own (below); nothing else may change.
    let fingerprint = |c: &mut postgres::Client| -> String {
        c.query_one("SELECT string_agg(format('%s/%s', quantity, version), ',') || (SELECT count(*) FROM quota.audit_log WHERE success)::text FROM quota.batches", &[])
            .unwrap()
            .get(0)
    };
    for (sql, expected) in cases {
        let before = fingerprint(&mut c);
        let got = c.batch_execute(&sql).err().map(|e| code(&e));
        assert_eq!(got.as_deref(), Some(expected), "{sql}");
        assert_eq!(fingerprint(&mut c), before, "{sql} changed something");
    }
    // Every refusal has its audit row; bad arguments are not decisions and have none.
    assert_eq!(
        settles_at(
            &mut c,
            "SELECT count(*) FROM quota.audit_log WHERE NOT success",
            4
        ),
        4
    );
    let reasons: String = c
        .query_one(
            "SELECT string_agg(format('%s:%s:%s:%s', action, coalesce(subject, '-'), coalesce(metric, '-'), reason), ' ' ORDER BY created_at, id)
               FROM quota.audit_log WHERE NOT success",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        reasons,
        "consume_batch:-:-:unknown_batch consume_batch:shop:milk:insufficient_quantity \
         consume_batch:shop:milk:version_conflict consume_item:shop:milk:insufficient_quantity"
    );
    // quota_ext.audit = off: no refusal rows either.
    c.batch_execute("SET quota_ext.audit = off").unwrap();
    assert_eq!(
        sqlstate(&mut c, &format!("SELECT quota.consume_batch_quantity('{id}', 6)")).as_deref(),
        Some("23514")
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        one_i64(&mut c, "SELECT count(*) FROM quota.audit_log WHERE NOT success"),
        4
    );
}

/// When no audit writer can start (max_worker_processes = 0 on the tiny server) refusal rows
/// wait in the queue until it is full (quota_ext.audit_queue_size = 16 there); the rest are
/// counted as rejected, and the callers still get their errors.
#[test]
fn a_full_audit_queue_counts_what_it_drops() {
    let db = TestDb::on(quota_ext_itests::env_port("QUOTA_EXT_TINY_PORT"), "audit_full");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.reset_metrics()").unwrap();
    let id: String = c
        .query_one("SELECT id::text FROM quota.create_batch('shop', 'milk', 5)", &[])
        .unwrap()
        .get(0);
    for _ in 0..40 {
        assert_eq!(
            sqlstate(&mut c, &format!("SELECT quota.consume_batch_quantity('{id}', 6)")).as_deref(),
            Some("23514")
        );
    }
    let metric = |c: &mut Client, name: &str| {
        one_i64(
            c,
            &format!("SELECT value FROM quota.metrics() WHERE name = '{name}'"),
        )
    };
    assert_eq!(metric(&mut c, "insufficient_quantity"), 40);
    assert_eq!(metric(&mut c, "audit_queued"), 16);
    assert_eq!(
        metric(&mut c, "audit_rejected"),
        24,
        "the rest found the queue full"
    );
    assert_eq!(metric(&mut c, "audit_dropped"), 0);
    assert_eq!(metric(&mut c, "audit_written"), 0);
    assert_eq!(
        one_i64(&mut c, "SELECT count(*) FROM quota.audit_log WHERE NOT success"),
        0
    );
    assert_eq!(one_i64(&mut c, "SELECT quantity FROM quota.batches"), 5);
}

/// A refusal whose writer cannot start because the only background worker slot is taken (here
/// by a parallel query's worker, on the server with max_worker_processes = 1) is not left
/// waiting for the next refusal: once the slot is free, the next call of a quota or batch
/// function asks for the writer again, and the row is written, once.
#[test]
fn a_refusal_row_stranded_without_a_worker_slot_is_written_once_one_frees() {
    let port = quota_ext_itests::env_port("QUOTA_EXT_SCARCE_PORT");
    let db = TestDb::on(port, "audit_scarce");
    let mut admin = connect_on(port, "postgres");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 1000)")
        .unwrap();
    let id: String = c
        .query_one("SELECT id::text FROM quota.create_batch('shop', 'milk', 5)", &[])
        .unwrap()
        .get(0);
    let refusals = "SELECT count(*) FROM quota.audit_log WHERE action = 'consume_batch' AND NOT success";
    let workers = |admin: &mut Client, kind: &str| {
        one_i64(
            admin,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE backend_type = '{kind}'"),
        )
    };

    // A parallel query takes the one slot for a few seconds.
    let mut busy = db.connect();
    // The setting's name since PostgreSQL 16; force_parallel_mode before.
    let force = if one_i64(&mut admin, "SELECT current_setting('server_version_num')::bigint") >= 160000 {
        "debug_parallel_query"
    } else {
        "force_parallel_mode"
    };
    let sleeper = thread::spawn(move || {
        busy.batch_execute(&format!("SET {force} = on; SELECT pg_sleep(4)"))
            .unwrap();
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while workers(&mut admin, "parallel worker") == 0 {
        assert!(std::time::Instant::now() < deadline, "no parallel worker started");
        thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        sqlstate(&mut c, &format!("SELECT quota.consume_batch_quantity('{id}', 6)")).as_deref(),
        Some("23514")
    );
    thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(one_i64(&mut c, refusals), 0, "no writer could have started");
    sleeper.join().unwrap();
    while workers(&mut admin, "parallel worker") != 0 {
        thread::sleep(std::time::Duration::from_millis(20));
    }

    // No further refusal: ordinary calls ask for the writer again (once a second; the slot
    // may come back to the postmaster a moment after the worker left pg_stat_activity).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while one_i64(&mut c, refusals) == 0 && std::time::Instant::now() < deadline {
        c.batch_execute("SELECT quota.consume('ann', 'api')").unwrap();
        thread::sleep(std::time::Duration::from_millis(300));
    }
    assert_eq!(
        settles_at(&mut c, refusals, 1),
        1,
        "the stranded row was written once"
    );
    let metric = |c: &mut Client, name: &str| {
        one_i64(
            c,
            &format!("SELECT value FROM quota.metrics() WHERE name = '{name}'"),
        )
    };
    assert_eq!(metric(&mut c, "audit_dropped"), 0);
}

/// A burst of refusals from parallel sessions, more than the queue holds (1 024 by default):
/// the writer drains while they arrive, and every refusal is either written or counted as
/// dropped — none lost silently, none written twice.
#[test]
fn a_burst_of_refusals_is_written_or_counted() {
    let db = TestDb::new("refusal_burst");
    let mut c = db.connect();
    let id: String = c
        .query_one("SELECT id::text FROM quota.create_batch('shop', 'milk', 1)", &[])
        .unwrap()
        .get(0);
    let dropped = |c: &mut Client| {
        one_i64(
            c,
            "SELECT value FROM quota.metrics() WHERE name = 'audit_dropped'",
        )
    };
    let dropped_before = dropped(&mut c);
    let handles = {
        let id = id.clone();
        in_parallel(&db, SESSIONS, move |_, c, start| {
            let stmt = c
                .prepare("SELECT quota.consume_batch_quantity($1::text::uuid, 2)")
                .unwrap();
            start();
            let mut refused = 0i64;
            for _ in 0..300 {
                match c.query_one(&stmt, &[&id]) {
                    Err(e) if code(&e) == "23514" => refused += 1,
                    other => panic!("expected 23514, got {other:?}"),
                }
            }
            refused
        })
    };
    let refusals: i64 = handles.into_iter().sum();
    assert_eq!(refusals, SESSIONS as i64 * 300);
    // Drops are counted cluster-wide; no other test on this server fills its queue.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (mut rows, mut lost);
    loop {
        rows = one_i64(&mut c, "SELECT count(*) FROM quota.audit_log WHERE NOT success");
        lost = dropped(&mut c) - dropped_before;
        if rows + lost >= refusals || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(1200));
    rows = one_i64(&mut c, "SELECT count(*) FROM quota.audit_log WHERE NOT success");
    lost = dropped(&mut c) - dropped_before;
    assert_eq!(rows + lost, refusals, "{rows} written, {lost} dropped");
    assert_eq!(one_i64(&mut c, "SELECT quantity FROM quota.batches"), 1);
}
