//! Inventory batches under real concurrency: exact totals, one winner per expected version, and
//! no deadlock between callers whose batch sets overlap.

use postgres::Client;
use quota_ext_itests::{
    assert_settles, audit_count, audit_rows, code, connect_on, in_parallel, metric, new_batch, one_i64,
    one_text, settles_at, sqlstate, untrusted_role_sql, TestDb,
};
use rand::Rng;
use std::thread;

const SESSIONS: usize = 8;

/// SESSIONS sessions at once (see in_parallel), each given the id of the batch they work on.
fn on_batch<T, F>(db: &TestDb, id: &str, session: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(&str, &mut Client, &dyn Fn()) -> T + Send + Sync + 'static,
{
    let id = id.to_string();
    in_parallel(db, SESSIONS, move |_, c, start| session(&id, c, start))
}

#[test]
fn eight_sessions_drain_a_batch_exactly() {
    let db = TestDb::new("drain");
    let mut c = db.connect();
    let id = new_batch(&mut c, "shop", "milk", 1000);
    let handles = on_batch(&db, &id, |id, c, start| {
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
    });
    let mut total = 0;
    for (taken, other) in handles {
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
    assert_eq!(audit_rows(&mut c, "action = 'consume_batch' AND success"), 1000);
    // Each session stopped at its first refusal: eight refusals, eight audit rows, written by
    // the audit writer although each refusal rolled its caller's transaction back.
    assert_settles(
        &mut c,
        "SELECT count(*) FROM quota.audit_log
              WHERE action = 'consume_batch' AND NOT success AND reason = 'insufficient_quantity'
                AND details->>'available' = '0' AND amount = 1",
        SESSIONS as i64,
    );
}

#[test]
fn one_expected_version_has_one_winner() {
    let db = TestDb::new("version");
    let mut c = db.connect();
    let id = new_batch(&mut c, "shop", "milk", 100);
    let handles = on_batch(&db, &id, |id, c, start| {
        start();
        c.query_one(
            "SELECT version FROM quota.consume_batch_quantity($1::text::uuid, 1, 1)",
            &[&id],
        )
        .map(|r| r.get::<_, i64>(0))
        .map_err(|e| code(&e))
    });
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
    assert_settles(
        &mut c,
        "SELECT count(*) FROM quota.audit_log
              WHERE NOT success AND reason = 'version_conflict'
                AND details->>'expected_version' = '1' AND details->>'version' = '2'",
        SESSIONS as i64 - 1,
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
    let flour_first = |c: &mut Client, order: &str| {
        one_text(
            c,
            &format!("SELECT id::text FROM quota.batches WHERE item = 'flour' ORDER BY {order} LIMIT 1"),
        )
    };
    let fefo_first = flour_first(&mut c, "expires_at");
    let fifo_first = flour_first(&mut c, "created_at");
    let last_fifo = flour_first(&mut c, "created_at DESC");
    assert_eq!(fefo_first, last_fifo);
    assert_ne!(fefo_first, fifo_first);
    let handles = in_parallel(&db, SESSIONS, move |i, c, start| {
        let (mut flour, mut milk, mut refused, mut other) = (0i64, 0i64, 0i64, Vec::new());
        let strategy = if i % 2 == 0 { "fefo" } else { "fifo" };
        start();
        for _ in 0..40 {
            let n: i64 = rand::thread_rng().gen_range(1..=5);
            let mut tally = |result: Result<postgres::Row, postgres::Error>, taken: &mut i64| match result {
                Ok(r) => *taken += r.get::<_, i64>(0),
                Err(e) if code(&e) == "23514" => refused += 1,
                Err(e) => other.push(code(&e)),
            };
            tally(
                c.query_one(
                    "SELECT sum(consumed)::bigint FROM quota.consume_item('shop', 'flour', $1, $2)",
                    &[&n, &strategy],
                ),
                &mut flour,
            );
            tally(
                c.query_one(
                    "SELECT sum(consumed)::bigint FROM quota.consume_item('shop', 'milk', $1)",
                    &[&n],
                ),
                &mut milk,
            );
        }
        (flour, milk, refused, other)
    });
    let (mut flour, mut milk, mut refusals) = (0, 0, 0);
    for (f, m, r, other) in handles {
        refusals += r;
        assert!(
            other.is_empty(),
            "errors other than insufficient quantity (40P01 = deadlock): {other:?}"
        );
        flour += f;
        milk += m;
    }
    for (item, taken) in [("flour", flour), ("milk", milk)] {
        let left = one_i64(
            &mut c,
            &format!("SELECT sum(quantity)::bigint FROM quota.batches WHERE item = '{item}'"),
        );
        assert_eq!(taken, 500 - left);
    }
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
    let calls = audit_rows(&mut c, "action = 'consume_item' AND success");
    let summed = one_i64(
        &mut c,
        "SELECT coalesce(sum(amount), 0)::bigint FROM quota.audit_log WHERE action = 'consume_item' AND success",
    );
    assert!(calls > 0);
    assert_eq!(summed, flour + milk);
    // And one per refusal, written by the audit writer.
    assert!(refusals > 0, "the test drains both items");
    assert_settles(
        &mut c,
        &audit_count("action = 'consume_item' AND NOT success"),
        refusals,
    );
}

#[test]
fn authenticated_callers_consume_only_their_own_batches() {
    let db = TestDb::new("batch_owner");
    let mut c = db.connect();
    c.batch_execute(&untrusted_role_sql("quota_app_user")).unwrap();
    let mine = new_batch(&mut c, "user-1", "milk", 10);
    let theirs = new_batch(&mut c, "user-2", "milk", 10);
    c.batch_execute(
        "SET ROLE quota_app_user; SELECT set_config('request.jwt.claims', '{\"sub\":\"user-1\"}', false)",
    )
    .unwrap();
    let err = |c: &mut postgres::Client, sql: &str| c.batch_execute(sql).err().map(|e| code(&e));
    // (a call, the SQLSTATE it fails with, if it does)
    for (sql, expected) in [
        (
            format!("SELECT quota.consume_batch_quantity('{theirs}', 1)"),
            Some("42501"),
        ),
        (
            "SELECT quota.consume_item('user-2', 'milk', 1)".to_string(),
            Some("42501"),
        ),
        (
            "SELECT quota.create_batch('user-1', 'milk', 1)".to_string(),
            Some("42501"),
        ),
        (format!("SELECT quota.consume_batch_quantity('{mine}', 1)"), None),
        ("SELECT quota.consume_item('user-1', 'milk', 2)".to_string(), None),
    ] {
        assert_eq!(err(&mut c, &sql).as_deref(), expected);
    }
    c.batch_execute("RESET ROLE").unwrap();
    for (owner, left) in [("user-1", 7), ("user-2", 10)] {
        assert_eq!(
            one_i64(
                &mut c,
                &format!("SELECT sum(quantity)::bigint FROM quota.batches WHERE owner = '{owner}'")
            ),
            left
        );
    }
}

/// Batch ids are unique per owner only (the key is (id, owner), for Citus): an id two owners
/// share, by an import or an explicit id, is consumed only from the caller's own batch, and a
/// trusted caller (who names no owner) is refused and changes nothing.
#[test]
fn an_id_two_owners_share_is_consumed_from_one_batch_only() {
    let db = TestDb::new("batch_shared_id");
    let mut c = db.connect();
    c.batch_execute(&untrusted_role_sql("quota_app_user")).unwrap();
    let id = new_batch(&mut c, "user-1", "milk", 10);
    c.batch_execute(&format!(
        "INSERT INTO quota.batches (id, owner, item, quantity, initial_quantity) VALUES ('{id}', 'user-2', 'milk', 10, 10)"
    ))
    .unwrap();
    let quantities = |c: &mut Client| {
        one_text(
            c,
            "SELECT string_agg(owner || '=' || quantity, ' ' ORDER BY owner) FROM quota.batches",
        )
    };
    let audit_before = one_i64(&mut c, "SELECT count(*) FROM quota.audit_log");
    let e = c
        .batch_execute(&format!("SELECT quota.consume_batch_quantity('{id}', 1)"))
        .unwrap_err();
    assert_eq!(code(&e), "21000", "{e:?}");
    assert!(format!("{e:?}").contains("2 owners"), "{e:?}");
    assert_eq!(
        quantities(&mut c),
        "user-1=10 user-2=10",
        "the refusal changed nothing"
    );
    assert_eq!(
        one_i64(&mut c, "SELECT count(*) FROM quota.audit_log"),
        audit_before
    );
    c.batch_execute(
        "SET ROLE quota_app_user; SELECT set_config('request.jwt.claims', '{\"sub\":\"user-1\"}', false)",
    )
    .unwrap();
    c.batch_execute(&format!("SELECT quota.consume_batch_quantity('{id}', 1)"))
        .unwrap();
    c.batch_execute("SELECT quota.consume_item('user-1', 'milk', 2)")
        .unwrap();
    // Too much for user-1's batch: refused with user-1's numbers, not user-2's.
    let e = c
        .batch_execute(&format!("SELECT quota.consume_batch_quantity('{id}', 8)"))
        .unwrap_err();
    assert_eq!(code(&e), "23514", "{e:?}");
    assert!(format!("{e:?}").contains("available 7"), "{e:?}");
    c.batch_execute("RESET ROLE").unwrap();
    assert_eq!(quantities(&mut c), "user-1=7 user-2=10");
}

#[test]
fn batch_refusals_have_their_own_sqlstate_and_change_nothing() {
    let db = TestDb::new("batch_bad");
    let mut c = db.connect();
    let id = new_batch(&mut c, "shop", "milk", 5);
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
    let fingerprint = |c: &mut postgres::Client| {
        one_text(
            c,
            "SELECT string_agg(format('%s/%s', quantity, version), ',') || (SELECT count(*) FROM quota.audit_log WHERE success)::text FROM quota.batches",
        )
    };
    for (sql, expected) in cases {
        let before = fingerprint(&mut c);
        let got = c.batch_execute(&sql).err().map(|e| code(&e));
        assert_eq!(got.as_deref(), Some(expected), "{sql}");
        assert_eq!(fingerprint(&mut c), before, "{sql} changed something");
    }
    // Every refusal has its audit row; bad arguments are not decisions and have none.
    assert_settles(&mut c, &audit_count("NOT success"), 4);
    let reasons = one_text(
        &mut c,
        "SELECT string_agg(format('%s:%s:%s:%s', action, coalesce(nullif(subject, ''), '-'), coalesce(metric, '-'), reason), ' ' ORDER BY created_at, id)
               FROM quota.audit_log WHERE NOT success",
    );
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
    assert_eq!(audit_rows(&mut c, "NOT success"), 4);
}

/// When no audit writer can start (max_worker_processes = 0 on the tiny server) refusal rows
/// wait in the queue until it is full (quota_ext.audit_queue_size = 16 there); the rest are
/// counted as rejected, and the callers still get their errors.
#[test]
fn a_full_audit_queue_counts_what_it_drops() {
    let db = TestDb::on(quota_ext_itests::env_port("QUOTA_EXT_TINY_PORT"), "audit_full");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.reset_metrics()").unwrap();
    let id = new_batch(&mut c, "shop", "milk", 5);
    for _ in 0..40 {
        assert_eq!(
            sqlstate(&mut c, &format!("SELECT quota.consume_batch_quantity('{id}', 6)")).as_deref(),
            Some("23514")
        );
    }
    assert_eq!(metric(&mut c, "insufficient_quantity"), 40);
    assert_eq!(metric(&mut c, "audit_queued"), 16);
    assert_eq!(
        metric(&mut c, "audit_rejected"),
        24,
        "the rest found the queue full"
    );
    assert_eq!(metric(&mut c, "audit_dropped"), 0);
    assert_eq!(metric(&mut c, "audit_written"), 0);
    assert_eq!(audit_rows(&mut c, "NOT success"), 0);
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
    let id = new_batch(&mut c, "shop", "milk", 5);
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
    assert_eq!(metric(&mut c, "audit_dropped"), 0);
}

/// A burst of refusals from parallel sessions, more than the queue holds (1 024 by default):
/// the writer drains while they arrive, and every refusal is either written or counted as
/// dropped — none lost silently, none written twice.
#[test]
fn a_burst_of_refusals_is_written_or_counted() {
    let db = TestDb::new("refusal_burst");
    let mut c = db.connect();
    let id = new_batch(&mut c, "shop", "milk", 1);
    let dropped = |c: &mut Client| metric(c, "audit_dropped");
    let dropped_before = dropped(&mut c);
    let handles = on_batch(&db, &id, |id, c, start| {
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
    });
    let refusals: i64 = handles.into_iter().sum();
    assert_eq!(refusals, SESSIONS as i64 * 300);
    // Drops are counted cluster-wide; no other test on this server fills its queue.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (mut rows, mut lost);
    loop {
        rows = audit_rows(&mut c, "NOT success");
        lost = dropped(&mut c) - dropped_before;
        if rows + lost >= refusals || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(1200));
    rows = audit_rows(&mut c, "NOT success");
    lost = dropped(&mut c) - dropped_before;
    assert_eq!(rows + lost, refusals, "{rows} written, {lost} dropped");
    assert_eq!(one_i64(&mut c, "SELECT quantity FROM quota.batches"), 1);
}
