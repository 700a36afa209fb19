//! A seeded, reproducible storm: 8 sessions run random consume / refund / set_limit / status
//! calls with random amounts, as trusted callers and as `authenticated` users, at random
//! isolation levels, some rolled back. At the end the books must balance exactly: for every
//! subject and window, usage equals the granted amounts minus the refunds in the audit log (and
//! what the clients saw committed); audit rows equal the committed decisions; and no granted row
//! shows a window past the limit it was checked against. QUOTA_EXT_RANDOM_SEED replays a run.

use postgres::Client;
use quota_ext_itests::{code, in_parallel, one_i64, TestDb};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const SESSIONS: u64 = 8;
const OPS: usize = 150;
const SUBJECTS: usize = 4;
const LIMITS: [i64; 3] = [10, 20, 30];

#[derive(Default)]
struct Tally {
    /// subject -> units granted minus refunded, committed
    net: HashMap<String, i64>,
    consume_decisions: i64,
    refunds: i64,
}

fn session(c: &mut Client, seed: u64, me: u64) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed ^ (me * 0x9e37_79b9));
    let mut t = Tally::default();
    // (subject, key, amount, made by a trusted caller) of this session's committed grants not
    // refunded yet: the subject refunds its own by key, a trusted caller those it made.
    let mut grants: Vec<(String, String, i64, bool)> = Vec::new();
    for op in 0..OPS {
        let level = ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"][rng.gen_range(0..3)];
        let rollback = rng.gen_bool(0.2);
        let subject = format!("r{}", rng.gen_range(0..SUBJECTS));
        let as_user = rng.gen_bool(0.5);
        let mut tx = c.build_transaction().isolation_level(match level {
            "READ COMMITTED" => postgres::IsolationLevel::ReadCommitted,
            "REPEATABLE READ" => postgres::IsolationLevel::RepeatableRead,
            _ => postgres::IsolationLevel::Serializable,
        });
        tx = tx.read_only(false);
        let mut tx = tx.start().unwrap();
        let roll = rng.gen_range(0..100);
        let refund_of = if (45..65).contains(&roll) && !grants.is_empty() {
            Some(grants.swap_remove(rng.gen_range(0..grants.len())))
        } else {
            None
        };
        let user_of = refund_of.as_ref().map(|g| g.0.clone()).unwrap_or(subject.clone());
        let user_refund = refund_of.as_ref().is_some_and(|g| !g.3);
        if (as_user && refund_of.is_none()) || user_refund {
            tx.batch_execute(&format!(
                "SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claims', '{{\"sub\":\"{user_of}\"}}', true)"
            ))
            .unwrap();
        }
        enum Done {
            Consume(String, String, i64, bool),
            Refund(String, i64, (String, String, i64, bool)),
            Other,
        }
        let result = if let Some(g) = refund_of.clone() {
            let amount = rng.gen_range(1..=g.2);
            let r = if g.3 {
                tx.query_one("SELECT replayed FROM quota.refund($2, 'm', $1)", &[&amount, &g.0])
            } else {
                tx.query_one(
                    "SELECT replayed FROM quota.refund(NULL, 'm', $1, $2)",
                    &[&amount, &g.1],
                )
            };
            r.map(|r| {
                assert!(!r.get::<_, bool>(0), "a grant's first refund is no replay");
                Done::Refund(g.0.clone(), amount, g)
            })
        } else if roll < 45 {
            let amount: i64 = rng.gen_range(0..=3);
            let key = format!("s{me}-{op}");
            let sql = if as_user {
                "SELECT allowed, replayed FROM quota.consume(NULL, 'm', $1, $2)"
            } else {
                "SELECT allowed, replayed FROM quota.consume($3, 'm', $1, $2)"
            };
            let r = if as_user {
                tx.query_one(sql, &[&amount, &key])
            } else {
                tx.query_one(sql, &[&amount, &key, &subject])
            };
            r.map(|r| Done::Consume(subject.clone(), key, amount, r.get::<_, bool>(0)))
        } else if roll < 80 {
            tx.batch_execute("RESET ROLE").unwrap();
            let period = ["total", "year"][rng.gen_range(0..2)];
            let lim = LIMITS[rng.gen_range(0..LIMITS.len())];
            tx.execute("SELECT quota.set_limit('free', 'm', $1, $2)", &[&period, &lim])
                .map(|_| Done::Other)
        } else {
            tx.query(&format!("SELECT * FROM quota.status('{user_of}')"), &[])
                .map(|_| Done::Other)
        };
        match result {
            Err(e) => {
                // Only serialization failures and deadlocks are expected of a random storm.
                let sqlstate = code(&e);
                assert!(
                    matches!(sqlstate.as_str(), "40001" | "40P01"),
                    "seed {seed}, session {me}, op {op}: {e:?}"
                );
                drop(tx);
                if let Some(g) = refund_of {
                    grants.push(g);
                }
            }
            Ok(done) if rollback => {
                tx.rollback().unwrap();
                if let Done::Refund(_, _, g) = done {
                    grants.push(g);
                }
            }
            Ok(done) => match tx.commit() {
                Err(e) => {
                    assert_eq!(code(&e), "40001", "seed {seed}: commit: {e:?}");
                    if let Done::Refund(_, _, g) = done {
                        grants.push(g);
                    }
                }
                Ok(()) => match done {
                    Done::Consume(s, key, amount, allowed) => {
                        if amount > 0 {
                            t.consume_decisions += 1;
                            if allowed {
                                *t.net.entry(s.clone()).or_default() += amount;
                                grants.push((s, key, amount, !as_user));
                            }
                        }
                    }
                    Done::Refund(s, amount, _) => {
                        t.refunds += 1;
                        *t.net.entry(s).or_default() -= amount;
                    }
                    Done::Other => {}
                },
            },
        }
    }
    t
}

#[test]
fn a_random_storm_of_calls_leaves_the_books_exact() {
    let seed: u64 = std::env::var("QUOTA_EXT_RANDOM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201);
    let db = TestDb::new("random_ops");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_limit('free', 'm', 'total', 20); SELECT quota.set_limit('free', 'm', 'year', 10);",
    )
    .unwrap();
    let tallies: Vec<Tally> = in_parallel(&db, SESSIONS as usize, move |me, c, _start| {
        session(c, seed, me as u64)
    });

    let decisions: i64 = tallies.iter().map(|t| t.consume_decisions).sum();
    let refunds: i64 = tallies.iter().map(|t| t.refunds).sum();
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT count(*) FROM quota.audit_log WHERE action = 'consume'"
        ),
        decisions,
        "seed {seed}: one audit row per committed decision"
    );
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT count(*) FROM quota.audit_log WHERE action = 'refund' AND success"
        ),
        refunds,
        "seed {seed}: one audit row per committed refund"
    );
    assert!(
        decisions > 100,
        "seed {seed}: the storm decided something ({decisions})"
    );
    for s in 0..SUBJECTS {
        let subject = format!("r{s}");
        let seen: i64 = tallies.iter().filter_map(|t| t.net.get(&subject)).sum();
        for period in ["total", "year"] {
            let used = one_i64(
                &mut c,
                &format!(
                    "SELECT coalesce(sum(used), 0)::bigint FROM quota.usage_totals
                      WHERE subject = '{subject}' AND metric = 'm' AND period = '{period}'"
                ),
            );
            let audited = one_i64(
                &mut c,
                &format!(
                    "SELECT coalesce(sum(CASE WHEN action = 'consume' THEN amount ELSE -amount END), 0)::bigint
                       FROM quota.audit_log WHERE subject = '{subject}' AND success AND action IN ('consume', 'refund')"
                ),
            );
            assert_eq!(
                used, audited,
                "seed {seed}: {subject} {period}: usage = grants - refunds in the audit log"
            );
            assert_eq!(
                used, seen,
                "seed {seed}: {subject} {period}: usage = what the clients saw committed"
            );
        }
    }
    // Every grant was checked against a limit that was set, and fit it in every window.
    let over = one_i64(
        &mut c,
        "SELECT count(*) FROM quota.audit_log a, jsonb_array_elements(a.details -> 'windows') w
          WHERE a.action = 'consume' AND a.success
            AND ((w ->> 'used')::bigint > (w ->> 'limit')::bigint
                 OR (w ->> 'limit')::bigint NOT IN (10, 20, 30))",
    );
    assert_eq!(over, 0, "seed {seed}: no window granted past its limit");
}
