//! The attacker's suite: each finding of the 0.5.0 review (README, Security model), replayed as
//! an untrusted caller in the shape PostgREST uses (a role switch and the request settings inside
//! one transaction), asserting that nothing the attacker wants happens and that what it did is
//! audited. Each test failed on 0.5.0.

use postgres::Client;
use quota_ext_itests::{
    assert_settles, audit_count, audit_rows, code, in_parallel, metric, new_batch, one_i64, one_text,
    settles_at, TestDb,
};

/// One request as PostgREST makes it: a transaction that switches to `role` and sets the JWT
/// claims (and, when given, the request headers) for itself only; Err is the SQLSTATE.
fn request(
    c: &mut Client,
    role: &str,
    claims: &str,
    headers: Option<&str>,
    sql: &str,
) -> Result<String, String> {
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL ROLE {role}; SELECT set_config('request.jwt.claims', $${claims}$$, true);"
    ))
    .unwrap();
    if let Some(h) = headers {
        tx.batch_execute(&format!("SELECT set_config('request.headers', $${h}$$, true)"))
            .unwrap();
    }
    let out = tx
        .query_one(&format!("SELECT ({sql})::text"), &[])
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .map_err(|e| code(&e));
    if out.is_ok() {
        tx.commit().unwrap();
    }
    out
}

fn user(c: &mut Client, sub: &str, sql: &str) -> Result<String, String> {
    request(
        c,
        "authenticated",
        &format!(r#"{{"sub":"{sub}","role":"authenticated"}}"#),
        None,
        sql,
    )
}

/// `sub`'s call is refused as not allowed (42501).
#[track_caller]
fn refused(c: &mut Client, sub: &str, sql: &str) {
    assert_eq!(user(c, sub, sql), Err("42501".into()));
}

/// One request of an anonymous client, whose proxies sent `headers`.
fn anon(c: &mut Client, headers: &str, sql: &str) -> String {
    request(c, "anon", r#"{"role":"anon"}"#, Some(headers), sql).unwrap()
}

fn forwarded_for(xff: &str) -> String {
    format!(r#"{{"x-forwarded-for":"{xff}"}}"#)
}

fn used(c: &mut Client, subject: &str) -> i64 {
    one_i64(
        c,
        &format!("SELECT coalesce(sum(used), 0)::bigint FROM quota.usage_totals WHERE subject = '{subject}'"),
    )
}

// 1. Refund lifts the quota.
#[test]
fn an_untrusted_refund_gives_back_only_a_grant_it_received_once() {
    let db = TestDb::new("adv_refund");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 3)")
        .unwrap();
    for k in ["k1", "k2", "k3"] {
        user(&mut c, "eve", &format!("quota.consume(NULL, 'api', 1, '{k}')")).unwrap();
    }
    assert!(user(&mut c, "eve", "(quota.consume(NULL, 'api', 1, 'k4')).allowed").unwrap() == "false");
    // What 0.5.0 let through: a refund of anything, of nothing named, or of more than the grant.
    for attack in [
        "quota.refund(NULL, 'api', 1000000)",
        "quota.refund(NULL, 'api')",
        "quota.refund(NULL, 'api', 2, 'k1')",
        "quota.refund(NULL, 'api', 1, 'k4')",
        "quota.refund(NULL, 'api', 1, 'no-such-key')",
        "quota.refund(NULL, 'other_metric', 1, 'k1')",
    ] {
        assert_eq!(user(&mut c, "eve", attack), Err("42501".into()), "{attack}");
        assert_eq!(used(&mut c, "eve"), 3, "{attack} changed usage");
    }
    // Another subject's key is not ours.
    refused(&mut c, "mallory", "quota.refund(NULL, 'api', 1, 'k1')");
    // The grant's own refund works, once; a repeat replays it.
    for (sql, answer) in [
        ("(quota.refund(NULL, 'api', 1, 'k1')).used", "2"),
        ("(quota.refund(NULL, 'api', 1, 'k1')).replayed", "true"),
    ] {
        assert_eq!(user(&mut c, "eve", sql).unwrap(), answer);
    }
    assert_eq!(
        user(&mut c, "eve", "quota.refund(NULL, 'api', 1, 'k1')").is_ok(),
        true
    );
    assert_eq!(used(&mut c, "eve"), 2, "a replay gives nothing back");
    refused(&mut c, "eve", "quota.refund(NULL, 'api', 0, 'k2')");
    // So exactly one more unit fits.
    for allowed in ["true", "false"] {
        assert_eq!(
            user(&mut c, "eve", "(quota.consume(NULL, 'api')).allowed").unwrap(),
            allowed
        );
    }
    // Every refused refund is audited (by the audit writer: the error rolls the caller back).
    assert_settles(
        &mut c,
        &audit_count("action = 'refund' AND NOT success AND reason = 'not_a_grant'"),
        8,
    );
    // Trusted callers keep the old refund.
    assert_eq!(
        one_i64(&mut c, "SELECT used FROM quota.refund('eve', 'api', 100)"),
        0
    );
}

// 1b. Two refunds of one grant at once: the key's row lock makes the second a replay.
#[test]
fn concurrent_refunds_of_one_grant_give_it_back_once() {
    let db = TestDb::new("adv_refund_race");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'total', 100)")
        .unwrap();
    for i in 0..20 {
        user(&mut c, "eve", &format!("quota.consume(NULL, 'api', 5, 'g{i}')")).unwrap();
    }
    let fresh: usize = in_parallel(&db, 4, |_, c, _start| {
        (0..20)
            .filter(|i| {
                user(
                    c,
                    "eve",
                    &format!("(quota.refund(NULL, 'api', 5, 'g{i}')).replayed"),
                )
                .unwrap()
                    == "false"
            })
            .count()
    })
    .into_iter()
    .sum();
    assert_eq!(fresh, 20, "each grant refunded exactly once");
    assert_eq!(used(&mut c, "eve"), 0);
}

// 2. Stale caches after a REPEATABLE READ or SERIALIZABLE transaction.
#[test]
fn no_cache_outlives_the_snapshot_transaction_that_filled_it() {
    let db = TestDb::new("adv_stale");
    let mut admin = db.connect();
    admin
        .batch_execute(
            "INSERT INTO quota.plans VALUES ('tiny', 'one a day');
             SELECT quota.set_limit('free', 'api', 'day', 1000);
             SELECT quota.set_limit('tiny', 'api', 'day', 1);",
        )
        .unwrap();
    // (what the other session commits, the subject, the call that shows the change)
    let cases: [(&str, &str, &str); 5] = [
        ("SELECT quota.set_limit('free', 'api', 'day', 1)", "limits", "consume"),
        ("SELECT quota.set_override('{s}', 'api', 'day', 1)", "overrides", "consume"),
        ("SELECT quota.set_plan('{s}', 'tiny')", "subjects", "consume"),
        ("INSERT INTO quota.plans VALUES ('gold{n}', 'new'); SELECT quota.set_limit('gold{n}', 'api', 'day', 1)", "plans", "claim"),
        (
            "INSERT INTO quota.rate_policies VALUES ('burst{n}', 'free', 1, '1 hour', NULL, false)",
            "rate_policies",
            "rate",
        ),
    ];
    let mut n = 0;
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        for (change, table, probe) in cases {
            n += 1;
            let s = format!("s{n}");
            let change = change.replace("{s}", &s).replace("{n}", &n.to_string());
            admin
                .batch_execute("SELECT quota.set_limit('free', 'api', 'day', 1000)")
                .unwrap();
            let mut a = db.connect();
            let claims = format!(r#"{{"sub":"{s}","app_metadata":{{"plan":"gold{n}"}}}}"#);
            a.batch_execute(&format!(
                "SELECT set_config('request.jwt.claims', $${claims}$$, false)"
            ))
            .unwrap();
            let call = match probe {
                "rate" => format!("SELECT allowed FROM quota.rate_limit('burst{n}')"),
                _ => format!("SELECT allowed FROM quota.consume('{s}', 'api')"),
            };
            // A warm cache first (peeks), then a transaction whose snapshot predates the change.
            let peek = match probe {
                "rate" => format!("SELECT quota.rate_limit('burst{n}', NULL, 0)"),
                _ => format!("SELECT quota.consume('{s}', 'api', 0)"),
            };
            let _ = a.batch_execute(&peek);
            a.batch_execute(&format!("BEGIN ISOLATION LEVEL {level}; SELECT 1"))
                .unwrap();
            admin.batch_execute(&change).unwrap();
            // Inside, the cache refills from the old snapshot (where the new policy does not
            // exist yet, the peek fails and the transaction rolls back: the fill is the same)...
            let _ = a.batch_execute(&peek);
            a.batch_execute("COMMIT").unwrap();
            // ...and after it the change applies.
            let first: bool = a.query_one(&call, &[]).unwrap().get(0);
            let second: bool = a.query_one(&call, &[]).unwrap().get(0);
            assert!(
                first && !second,
                "{level}, {table}: after commit the limit of 1 must apply"
            );
        }
    }
}

// 3. Spoofable client address.
#[test]
fn a_client_cannot_choose_its_address() {
    let db = TestDb::new("adv_ip");
    let mut c = db.connect();
    c.batch_execute(
        "INSERT INTO quota.rate_policies VALUES ('ipcheck', 'anonymous', 3, '1 hour', NULL, false)",
    )
    .unwrap();
    let ipcheck = |c: &mut Client, xff: &str| -> (String, bool) {
        let out = anon(c, &forwarded_for(xff), "quota.rate_limit('ipcheck')");
        let allowed = out.starts_with("(t,");
        let key = out.split(',').nth(1).unwrap_or_default().to_string();
        (key, allowed)
    };
    // Behind one proxy that appends the peer address, the rightmost entry is the client's:
    // rotating what the client writes to the left changes nothing.
    let mut passed = 0;
    for i in 0..10 {
        let (key, allowed) = ipcheck(&mut c, &format!("10.9.9.{i}, 203.0.113.7"));
        assert_eq!(key, "ip:203.0.113.7");
        passed += allowed as i32;
    }
    assert_eq!(passed, 3, "rotating X-Forwarded-For is limited like one client");
    // Writing a victim's address spends nothing of the victim's bucket.
    let (key, allowed) = ipcheck(&mut c, "198.51.100.1");
    assert_eq!((key.as_str(), allowed), ("ip:198.51.100.1", true));
    // Two proxies (Cloudflare in front of the gateway): the second entry from the right.
    let mut c2 = db.connect();
    c2.batch_execute("SET quota_ext.trusted_proxy_hops = 2").unwrap();
    assert_eq!(ipcheck(&mut c2, "1.1.1.1, 192.0.2.5, 10.0.0.1").0, "ip:192.0.2.5");
    assert_eq!(
        ipcheck(&mut c2, "192.0.2.9").0,
        "ip:192.0.2.9",
        "a shorter list gives its leftmost"
    );
    // A single-value header (Cloudflare's CF-Connecting-IP).
    c2.batch_execute(
        "SET quota_ext.client_ip_header = 'CF-Connecting-IP'; SET quota_ext.trusted_proxy_hops = 1",
    )
    .unwrap();
    let h = r#"{"cf-connecting-ip":"192.0.2.77","x-forwarded-for":"6.6.6.6"}"#;
    let key = |c: &mut Client| anon(c, h, "(quota.rate_limit('ipcheck')).key");
    assert_eq!(key(&mut c2), "ip:192.0.2.77");
    // A bare PostgREST: no header can be trusted.
    c2.batch_execute("SET quota_ext.trusted_proxy_hops = 0").unwrap();
    assert_eq!(key(&mut c2), "ip:unknown");
    // The settings are the administrator's: a client cannot change them.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SET LOCAL ROLE anon").unwrap();
    let e = tx
        .batch_execute("SET quota_ext.trusted_proxy_hops = 5")
        .unwrap_err();
    assert_eq!(code(&e), "42501");
}

// 5. Refusals whose audit row was silently dropped; the JWT subject's length.
#[test]
fn every_refusal_of_a_valid_call_is_audited_whatever_its_strings() {
    let db = TestDb::new("adv_audit_big");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 0)")
        .unwrap();
    // 256 control characters each: six bytes apiece once JSON escapes them.
    let ctl: String = "\u{1}".repeat(256);
    let sub: String = "\u{2}".repeat(256);
    let claims = format!(r#"{{"sub":"{}"}}"#, sub.replace('\u{2}', "\\u0002"));
    let before = audit_rows(&mut c, "NOT success");
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SET LOCAL ROLE authenticated").unwrap();
    tx.execute("SELECT set_config('request.jwt.claims', $1, true)", &[&claims])
        .unwrap();
    let e = tx
        .query_one("SELECT quota.require(NULL, 'api', 1, $1)", &[&ctl])
        .unwrap_err();
    assert_eq!(code(&e), "PT429");
    drop(tx);
    assert_settles(
        &mut c,
        &audit_count("NOT success AND length(idempotency_key) = 256 AND length(subject) = 256"),
        1,
    );
    assert_eq!(audit_rows(&mut c, "NOT success") - before, 1);
    // A JWT subject longer than a subject may be: 22001, like a subject argument.
    let long = format!(r#"{{"sub":"{}"}}"#, "x".repeat(257));
    for f in [
        "quota.consume(NULL, 'api')",
        "quota.status()",
        "quota.rate_limit('default')",
    ] {
        assert_eq!(
            request(&mut c, "authenticated", &long, None, f),
            Err("22001".into()),
            "{f}"
        );
    }
}

/// `n` databases on the server on `port`, with a connection to each and a limit of zero for
/// metric 'zero', so that every require of it is a refusal the audit writer writes.
fn refusing_databases(port: u16, name: &str, n: usize) -> (Vec<TestDb>, Vec<Client>) {
    let dbs: Vec<TestDb> = (0..n).map(|i| TestDb::on(port, &format!("{name}{i}"))).collect();
    let mut cs: Vec<Client> = dbs.iter().map(|d| d.connect()).collect();
    for c in cs.iter_mut() {
        c.batch_execute("SELECT quota.set_limit('free', 'zero', 'day', 0)")
            .unwrap();
    }
    (dbs, cs)
}

/// Queue one refusal in `db` (a require that is denied: its audit row goes to the writer).
fn queue_refusal(c: &mut Client) {
    let e = c
        .batch_execute("SELECT quota.require('nobody', 'zero')")
        .unwrap_err();
    assert_eq!(code(&e), "PT429");
}

// 6. Queued audit rows stranded: more databases than writer slots, and a terminated writer.
#[test]
fn rows_of_more_databases_than_writer_slots_all_arrive() {
    // Eight writers run at a time; databases nine and ten find every slot busy (0.5.0 left
    // their rows queued until the next quota_ext call on the server; on this server of its
    // own none comes).
    let port = quota_ext_itests::env_port("QUOTA_EXT_WRITERS_PORT");
    let (_dbs, mut cs) = refusing_databases(port, "adv_slots", 10);
    for c in cs.iter_mut() {
        queue_refusal(c);
    }
    for c in cs.iter_mut() {
        assert_settles(c, &audit_count("NOT success"), 1);
    }
}

#[test]
fn queued_rows_are_written_dropped_or_still_queued_with_one_worker_slot() {
    let port = quota_ext_itests::env_port("QUOTA_EXT_SCARCE_PORT");
    // On the server with one background worker slot: every database's writer needs that slot.
    let (dbs, mut cs) = refusing_databases(port, "adv_strand", 3);
    // The counters are the server's; any database with the extension reads them.
    let mut admin = dbs[0].connect();
    let queued0 = metric(&mut admin, "audit_queued");
    let (written0, dropped0) = (
        metric(&mut admin, "audit_written"),
        metric(&mut admin, "audit_dropped"),
    );
    for round in 0..3 {
        for c in cs.iter_mut() {
            queue_refusal(c);
        }
        let _ = round;
    }
    for c in cs.iter_mut() {
        assert_eq!(
            settles_at(c, &audit_count("NOT success"), 3),
            3,
            "every database's rows arrive although only one writer can run at a time"
        );
    }
    assert_eq!(metric(&mut admin, "audit_queue_depth"), 0);
    assert_eq!(
        metric(&mut admin, "audit_queued") - queued0,
        (metric(&mut admin, "audit_written") - written0) + (metric(&mut admin, "audit_dropped") - dropped0)
    );
}

#[test]
fn rows_a_terminated_writer_leaves_behind_are_written() {
    let db = TestDb::new("adv_terminated");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'zero', 'day', 0)")
        .unwrap();
    // Catch the database's writer while it runs (it exits about a second after its last row).
    let mut queued = 0;
    let pid = loop {
        queue_refusal(&mut c);
        queued += 1;
        let sql = format!(
            "SELECT pid::bigint FROM pg_stat_activity WHERE backend_type = 'quota_ext audit writer' AND datname = '{}'",
            db.name
        );
        let found = (0..20).find_map(|_| {
            let r = c.query_opt(&sql, &[]).unwrap().map(|r| r.get::<_, i64>(0));
            if r.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r
        });
        if let Some(p) = found {
            break p;
        }
        assert!(queued < 20, "no writer ever ran");
    };
    // Stopped, it cannot scan; a row queued now only sets its latch; terminated, it wakes to
    // the signal and exits without scanning again: the row is left behind.
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success())
    };
    signal("-STOP");
    queue_refusal(&mut c);
    queued += 1;
    c.batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    signal("-CONT");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Any quota_ext call of the server (here a peek) starts a writer for it.
    c.batch_execute("SELECT quota.consume('someone', 'zero', 0)")
        .unwrap();
    assert_settles(&mut c, &audit_count("NOT success"), queued);
}

// 7. Windows that overlapped where DST starts at midnight.
#[test]
fn every_window_ends_where_the_next_begins_in_every_time_zone() {
    let db = TestDb::new("adv_dst");
    let mut c = db.connect();
    let havana = one_text(
        &mut c,
        "SELECT (reset_at = (SELECT window_start FROM quota.window_bounds('day', 'America/Havana', '2024-03-11 12:00-04')))::text
           FROM quota.window_bounds('day', 'America/Havana', '2024-03-10 12:00-04')",
    );
    assert_eq!(havana, "true");
    // For every zone PostgreSQL knows and every calendar period, windows chained from 2023 to
    // 2026: each contains the instant it was asked for, and its end is the next one's start.
    let bad = one_i64(
        &mut c,
        "WITH RECURSIVE zones AS (SELECT name FROM pg_timezone_names),
              periods(p, steps) AS (VALUES ('day', 1100), ('week', 160), ('month', 40), ('year', 4)),
              chain AS (
                SELECT z.name, p.p, p.steps, 0 AS n, w.window_start, w.reset_at
                  FROM zones z, periods p, quota.window_bounds(p.p, z.name, '2023-01-01 00:00+00') w
                UNION ALL
                SELECT c.name, c.p, c.steps, c.n + 1, w.window_start, w.reset_at
                  FROM chain c, quota.window_bounds(c.p, c.name, c.reset_at) w
                 WHERE c.n < c.steps)
         SELECT count(*) FROM chain c
          WHERE NOT (c.window_start < c.reset_at)
             OR c.n > 0 AND c.window_start <> (SELECT w.window_start FROM quota.window_bounds(c.p, c.name, c.window_start) w)",
    );
    assert_eq!(bad, 0);
    let gaps = one_i64(
        &mut c,
        "WITH RECURSIVE chain AS (
            SELECT z.name, p.p, 0 AS n, w.window_start, w.reset_at
              FROM pg_timezone_names z, (VALUES ('day'), ('week'), ('month'), ('year')) p(p),
                   quota.window_bounds(p.p, z.name, '2023-01-01 00:00+00') w
            UNION ALL
            SELECT c.name, c.p, c.n + 1, w.window_start, w.reset_at
              FROM chain c, quota.window_bounds(c.p, c.name, c.reset_at) w
             WHERE c.reset_at < '2026-06-01')
         SELECT count(*) FROM (
            SELECT window_start, lag(reset_at) OVER (PARTITION BY name, p ORDER BY n) AS prev_end FROM chain) x
          WHERE prev_end IS NOT NULL AND prev_end <> window_start",
    );
    assert_eq!(gaps, 0, "a window's reset_at is the next window's window_start");
    // Hours and minutes around every offset change of 2024 (the 30- and 45-minute zones too).
    let bad = one_i64(
        &mut c,
        "WITH z AS (SELECT name FROM pg_timezone_names),
              t AS (SELECT z.name, g AS at FROM z, generate_series('2024-01-01 00:00+00'::timestamptz, '2025-01-01', '7 hours 13 minutes') g),
              w AS (SELECT t.name, p.p, t.at, b.window_start, b.reset_at
                      FROM t, (VALUES ('hour'), ('minute'), ('day')) p(p), quota.window_bounds(p.p, t.name, t.at) b)
         SELECT count(*) FROM w
          WHERE NOT (w.window_start <= w.at AND w.at < w.reset_at)
             OR (SELECT b.window_start FROM quota.window_bounds(w.p, w.name, w.reset_at) b) <> w.reset_at",
    );
    assert_eq!(bad, 0);
}

// 8. Schema squatting.

/// A database in which a role with CREATE on it (and nothing else) made schema `quota` first.
fn squatted(db: &TestDb) -> Client {
    let mut c = db.connect();
    c.batch_execute(&format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'squatter') THEN CREATE ROLE squatter; END IF; END $$;
         GRANT CREATE ON DATABASE {} TO squatter;
         SET ROLE squatter; CREATE SCHEMA quota; RESET ROLE;",
        db.name
    ))
    .unwrap();
    c
}

#[test]
fn an_existing_schema_of_another_role_is_refused() {
    let db = quota_ext_itests::TestDb::bare("adv_squat");
    let mut c = squatted(&db);
    let e = c.batch_execute("CREATE EXTENSION quota_ext").unwrap_err();
    assert_eq!(code(&e), "42P06");
    assert!(e.as_db_error().unwrap().message().contains("squatter"), "{e:?}");
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT count(*) FROM pg_extension WHERE extname = 'quota_ext'"
        ),
        0
    );
    // The owner's own schema made beforehand is fine.
    c.batch_execute("DROP SCHEMA quota; CREATE SCHEMA quota; CREATE EXTENSION quota_ext; SELECT quota.set_limit('free', 'api', 'day', 1)")
        .unwrap();
    c.batch_execute(&format!("REVOKE CREATE ON DATABASE {} FROM squatter", db.name))
        .unwrap();
}

// 9. The smaller findings.
#[test]
fn refusals_reveal_nothing_of_other_subjects() {
    let db = TestDb::new("adv_leaks");
    let mut c = db.connect();
    let theirs = new_batch(&mut c, "alice-secret-owner", "milk", 5);
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 5)")
        .unwrap();
    // Bob's row is older than Alice's: a before_id of hers would page it in 0.5.0.
    user(&mut c, "bob", "quota.consume(NULL, 'api')").unwrap();
    c.batch_execute("SELECT quota.consume('alice', 'api')").unwrap();
    let alice_id = one_i64(
        &mut c,
        "SELECT max(id) FROM quota.audit_log WHERE subject = 'alice'",
    );
    // The not-owner error names no owner.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        r#"SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claims', '{"sub":"bob"}', true)"#,
    )
    .unwrap();
    let e = tx
        .batch_execute(&format!("SELECT quota.consume_batch_quantity('{theirs}', 1)"))
        .unwrap_err();
    let db_err = e.as_db_error().unwrap();
    assert_eq!(db_err.code().code(), "42501");
    let all = format!("{} {:?} {:?}", db_err.message(), db_err.detail(), db_err.hint());
    assert!(!all.contains("alice-secret-owner"), "{all}");
    drop(tx);
    // before_id of another subject's row pages like an id that does not exist.
    let page = |c: &mut Client, before: i64| {
        user(
            c,
            "bob",
            &format!("(SELECT count(*) FROM quota.audit_page(NULL, {before}))"),
        )
        .unwrap()
    };
    assert_eq!(page(&mut c, alice_id), page(&mut c, -1));
    assert_eq!(page(&mut c, -1), "0");
}

#[test]
fn the_audit_trail_records_who_acted_and_the_writer_acts_as_the_extension_owner() {
    let db = quota_ext_itests::TestDb::bare("adv_actor");
    let mut c = db.connect();
    c.batch_execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'quota_admin_owner') THEN
             CREATE ROLE quota_admin_owner SUPERUSER NOLOGIN; END IF; END $$;
         SET ROLE quota_admin_owner; CREATE EXTENSION quota_ext; RESET ROLE;
         CREATE TABLE public.writer_roles (r text);
         CREATE FUNCTION public.note_role() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO public.writer_roles VALUES (current_user); RETURN NULL; END $$;
         CREATE TRIGGER note AFTER INSERT ON quota.audit_log FOR EACH ROW EXECUTE FUNCTION public.note_role();
         GRANT INSERT ON public.writer_roles TO PUBLIC;
         SELECT quota.set_limit('free', 'api', 'day', 1);",
    )
    .unwrap();
    c.batch_execute("SET ROLE service_role; SELECT quota.consume('carol', 'api'); RESET ROLE")
        .unwrap();
    user(&mut c, "dan", "quota.consume(NULL, 'api')").unwrap();
    let actors = one_text(
        &mut c,
        "SELECT string_agg(format('%s:%s', action, coalesce(actor, '-')), ',' ORDER BY id) FROM quota.audit_log",
    );
    assert_eq!(actors, "set_limit:postgres,consume:service_role,consume:-");
    // A refusal that raises is written by the audit writer, as the extension's owner.
    c.batch_execute("TRUNCATE public.writer_roles").unwrap();
    let e = c
        .batch_execute("SELECT quota.require('carol', 'api')")
        .unwrap_err();
    assert_eq!(code(&e), "PT429");
    assert_settles(&mut c, "SELECT count(*) FROM public.writer_roles", 1);
    assert_eq!(
        one_text(&mut c, "SELECT r FROM public.writer_roles"),
        "quota_admin_owner"
    );
    assert_eq!(
        one_text(&mut c, "SELECT actor FROM quota.audit_log WHERE NOT success"),
        "postgres"
    );
}

#[test]
fn a_session_level_legacy_subject_left_on_a_pooled_connection_is_not_honoured() {
    let db = TestDb::new("adv_legacy");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 5)")
        .unwrap();
    // A previous client of the pooled connection left a session-level setting behind.
    c.batch_execute("SET request.jwt.claim.sub = 'victim'").unwrap();
    assert_eq!(
        request(
            &mut c,
            "authenticated",
            r#"{"role":"authenticated"}"#,
            None,
            "quota.consume(NULL, 'api')"
        ),
        Err("42501".into())
    );
    // Set for the request itself (as old PostgREST versions did), it counts.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        "SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claim.sub', 'victim', true);
         SELECT set_config('request.jwt.claims', '', true)",
    )
    .unwrap();
    let s = one_text(&mut tx, "SELECT subject FROM quota.consume(NULL, 'api')");
    assert_eq!(s, "victim");
}

#[test]
fn settings_with_high_bit_names_do_not_hide_the_claims() {
    let db = TestDb::new("adv_guc_order");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_limit('free', 'api', 'day', 5);
         SELECT set_config('request.é' || i, 'x', false) FROM generate_series(1, 1500) i;",
    )
    .unwrap();
    assert_eq!(
        user(&mut c, "zoe", "(quota.consume(NULL, 'api')).subject").unwrap(),
        "zoe"
    );
}

// 11. One plan rule for quotas and rate limits.
#[test]
fn quotas_and_rate_limits_take_the_plan_by_one_rule() {
    let db = TestDb::new("adv_plan");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_limit('free', 'api', 'day', 1);
         SELECT quota.set_limit('pro', 'api', 'day', 100);
         SELECT quota.set_plan('recorded', 'free');",
    )
    .unwrap();
    let pro = |sub: &str| format!(r#"{{"sub":"{sub}","app_metadata":{{"plan":"pro"}}}}"#);
    let fake = r#"{"sub":"faker","app_metadata":{"plan":"platinum"}}"#.to_string();
    let quota_limit = "(quota.consume(NULL, 'api')).quota_limit";
    let rate_limit = "(quota.rate_limit('default')).rate_limit";
    // (the claims, the call, what it answers)
    for (claims, sql, answer) in [
        // The plan of record wins over the claim, for quotas and rate limits alike.
        (pro("recorded"), quota_limit, "1"),
        (pro("recorded"), rate_limit, "100"),
        // Without a row, the claim applies to both.
        (pro("claimed"), quota_limit, "100"),
        (pro("claimed"), rate_limit, "1000"),
        (
            pro("claimed"),
            "(SELECT quota_limit FROM quota.status() LIMIT 1)",
            "100",
        ),
        // A claim naming no plan: the default plan.
        (fake.clone(), quota_limit, "1"),
        (fake, rate_limit, "100"),
    ] {
        assert_eq!(
            request(&mut c, "authenticated", &claims, None, sql).unwrap(),
            answer
        );
    }
}

// 1c. A service's grant is the service's to refund, and a key the subject claimed and refunded
// first hands the service no free grant; refunds by clients can be switched off.
#[test]
fn a_subject_can_neither_refund_nor_preempt_a_services_grant() {
    let db = TestDb::new("adv_refund_service");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 10)")
        .unwrap();
    // The service charges the subject (a trusted caller, with its own key).
    c.batch_execute("SELECT quota.consume('zed', 'api', 1, 'order-1')")
        .unwrap();
    refused(&mut c, "zed", "quota.refund(NULL, 'api', 1, 'order-1')");
    assert_eq!(used(&mut c, "zed"), 1);
    // The subject guesses the service's next key, consumes and refunds it first...
    user(&mut c, "zed", "quota.consume(NULL, 'api', 1, 'order-2')").unwrap();
    user(&mut c, "zed", "quota.refund(NULL, 'api', 1, 'order-2')").unwrap();
    assert_eq!(used(&mut c, "zed"), 1);
    // ...then the service's consume with that key is a replay of a grant that no longer stands.
    let r = c
        .query_one(
            "SELECT allowed, replayed FROM quota.consume('zed', 'api', 1, 'order-2')",
            &[],
        )
        .unwrap();
    assert_eq!((r.get::<_, bool>(0), r.get::<_, bool>(1)), (false, true));
    // With quota_ext.untrusted_refunds off, only trusted roles refund.
    c.batch_execute("SET quota_ext.untrusted_refunds = off").unwrap();
    user(&mut c, "zed", "quota.consume(NULL, 'api', 1, 'k-off')").unwrap();
    refused(&mut c, "zed", "quota.refund(NULL, 'api', 1, 'k-off')");
    assert_eq!(used(&mut c, "zed"), 2);
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT used FROM quota.refund('zed', 'api', 1, 'svc-refund')"
        ),
        1
    );
}

// 3b. One client, one key, whatever the proxy's notation; rate_check keys never name a
// policy's bucket.
#[test]
fn addresses_are_normalized_and_rate_check_keys_stay_apart_from_policy_buckets() {
    let db = TestDb::new("adv_ip_norm");
    let mut c = db.connect();
    let key = |c: &mut Client, xff: &str| anon(c, &forwarded_for(xff), "(quota.rate_limit('default')).key");
    assert_eq!(key(&mut c, "2001:db8:1:2::5"), "ip:2001:db8:1:2::/64");
    assert_eq!(key(&mut c, "[2001:db8:1:2:ffff::6]:443"), "ip:2001:db8:1:2::/64");
    assert_eq!(key(&mut c, "192.0.2.1:5000"), "ip:192.0.2.1");
    assert_eq!(key(&mut c, "::ffff:192.0.2.1"), "ip:192.0.2.1");
    // A rate_check key spelled like the bucket of policy 'default' for subject 'victim'
    // (policy, 0x1f, key) drains nothing of it.
    c.batch_execute("SELECT quota.rate_check(E'default\\x1fvictim', 1, '1 day', 1)")
        .unwrap();
    assert_eq!(
        user(&mut c, "victim", "(quota.rate_limit('default')).remaining").unwrap(),
        "99"
    );
}

// 8b. An installation of 0.5.0 into a squatted schema is not upgraded, and not served.
#[test]
fn a_squatted_installation_is_neither_upgraded_nor_served() {
    let db = quota_ext_itests::TestDb::bare("adv_squat_upgrade");
    let mut c = squatted(&db);
    c.batch_execute("CREATE EXTENSION quota_ext VERSION '0.5.0'")
        .unwrap();
    let e = c.batch_execute("ALTER EXTENSION quota_ext UPDATE").unwrap_err();
    assert_eq!(code(&e), "42P06");
    // Nothing switches to the superuser owner while the schema is another role's.
    let e = c.batch_execute("SELECT quota.status('anyone')").unwrap_err();
    assert_eq!(code(&e), "42501", "{e:?}");
    c.batch_execute(&format!("REVOKE CREATE ON DATABASE {} FROM squatter", db.name))
        .unwrap();
}

#[test]
fn functions_that_read_the_request_settings_stay_in_the_leader() {
    let db = TestDb::new("adv_parallel");
    let mut c = db.connect();
    let labels = one_text(
        &mut c,
        "SELECT string_agg(proname::text || ':' || proparallel::text, ',' ORDER BY proname) FROM pg_proc
          WHERE pronamespace = 'quota'::regnamespace
            AND proname IN ('rate_limit', 'request_rate_decision', 'status', 'audit_page', 'consume', 'refund')",
    );
    assert_eq!(
        labels,
        "audit_page:r,consume:u,rate_limit:r,refund:u,request_rate_decision:r,status:r"
    );
}
