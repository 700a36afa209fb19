//! Behaviour inside one backend (run by `cargo pgrx test`, as a superuser, each test in its own
//! transaction). Concurrency, SQLSTATEs, roles and transactions are tested from outside, in
//! pgrx-tests/.
use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn one<T: IntoDatum + FromDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    #[pg_test]
    fn consume_counts_until_denied() {
        run("SELECT quota.set_limit('free', 'api', 'day', 3)");
        for i in 1..=3 {
            assert_eq!(
                one::<i64>("SELECT used FROM quota.consume('alice', 'api')"),
                Some(i)
            );
        }
        assert_eq!(
            one::<bool>("SELECT allowed FROM quota.consume('alice', 'api')"),
            Some(false)
        );
        let d = "SELECT remaining = 0 AND used = 3 AND quota_limit = 3 AND period = 'day'
                   AND retry_after_seconds BETWEEN 1 AND 86400 AND NOT replayed
                   AND reset_at = date_trunc('day', now(), 'UTC') + interval '1 day'
                 FROM quota.consume('alice', 'api')";
        assert_eq!(one::<bool>(d), Some(true));
        assert_eq!(
            one::<i64>("SELECT used FROM quota.usage WHERE subject = 'alice'"),
            Some(3)
        );
        // Granted decisions answer retry 0.
        run("SELECT quota.set_limit('free', 'api', 'day', 10)");
        assert_eq!(
            one::<i32>("SELECT retry_after_seconds FROM quota.consume('alice', 'api')"),
            Some(0)
        );
    }

    #[pg_test]
    fn all_or_nothing_across_periods() {
        run("SELECT quota.set_limit('free', 'search', 'day', 10)");
        run("SELECT quota.set_limit('free', 'search', 'hour', 3)");
        assert_eq!(
            one::<i64>("SELECT used FROM quota.consume('bob', 'search', 2)"),
            Some(2)
        );
        // Binding period when allowed: the one with the least remaining (hour: 1 left).
        assert_eq!(
            one::<String>("SELECT period FROM quota.consume('bob', 'search', 0)"),
            Some("hour".into())
        );
        let denied = one::<String>("SELECT period FROM quota.consume('bob', 'search', 2) WHERE NOT allowed");
        assert_eq!(denied, Some("hour".into()));
        // The day window was not incremented by the denied call.
        assert_eq!(
            one::<i64>("SELECT sum(used)::bigint FROM quota.usage WHERE subject = 'bob'"),
            Some(4)
        );
        let details = "SELECT (details->'windows')::text FROM quota.audit_log
                       WHERE subject = 'bob' AND NOT success";
        assert_eq!(
            one::<String>(details),
            Some(
                r#"[{"used": 2, "limit": 3, "period": "hour"}, {"used": 2, "limit": 10, "period": "day"}]"#
                    .into()
            )
        );
        assert_eq!(
            one::<i64>("SELECT used FROM quota.usage WHERE subject = 'bob' AND period = 'day'"),
            Some(2)
        );
    }

    #[pg_test]
    fn amount_above_limit_is_denied_outright() {
        run("SELECT quota.set_limit('free', 'upload', 'month', 5)");
        let q = "SELECT NOT allowed AND retry_after_seconds IS NULL AND used = 0
                 FROM quota.consume('carol', 'upload', 6)";
        assert_eq!(one::<bool>(q), Some(true));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM quota.usage WHERE subject = 'carol'"),
            Some(0)
        );
    }

    #[pg_test]
    fn peek_changes_nothing() {
        run("SELECT quota.set_limit('free', 'api', 'minute', 1)");
        assert_eq!(
            one::<bool>("SELECT allowed FROM quota.consume('dave', 'api', 0)"),
            Some(true)
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM quota.usage"), Some(0));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM quota.audit_log WHERE subject = 'dave'"),
            Some(0)
        );
        run("SELECT quota.consume('dave', 'api')");
        assert_eq!(
            one::<bool>("SELECT allowed FROM quota.consume('dave', 'api', 0)"),
            Some(false)
        );
        assert_eq!(
            one::<i64>("SELECT used FROM quota.usage WHERE subject = 'dave'"),
            Some(1)
        );
    }

    #[pg_test]
    fn plans_and_overrides() {
        run("SELECT quota.set_limit('free', 'api', 'day', 1)");
        run("SELECT quota.set_limit('pro', 'api', 'day', 100)");
        run("SELECT quota.set_plan('erin', 'pro')");
        assert_eq!(
            one::<i64>("SELECT quota_limit FROM quota.consume('erin', 'api')"),
            Some(100)
        );
        run("SELECT quota.set_override('erin', 'api', 'day', 7)");
        assert_eq!(
            one::<i64>("SELECT quota_limit FROM quota.consume('erin', 'api')"),
            Some(7)
        );
        // An override for a period the plan does not limit adds that period.
        run("SELECT quota.set_override('erin', 'api', 'total', 2)");
        assert_eq!(one::<i64>("SELECT count(*) FROM quota.status('erin')"), Some(2));
        run("SELECT quota.set_override('erin', 'api', 'day', NULL)");
        assert_eq!(
            one::<i64>("SELECT quota_limit FROM quota.status('erin') WHERE period = 'day'"),
            Some(100)
        );
        // quota_ext.default_plan decides for subjects without a row.
        run("SET LOCAL quota_ext.default_plan = 'pro'");
        assert_eq!(
            one::<i64>("SELECT quota_limit FROM quota.consume('frank', 'api')"),
            Some(100)
        );
    }

    #[pg_test]
    fn windows_follow_the_subject_time_zone() {
        run("SELECT quota.set_limit('free', 'api', 'day', 5)");
        run("SELECT quota.set_plan('tokyo', 'free', 'Asia/Tokyo')");
        run("SELECT quota.consume('tokyo', 'api')");
        let q = "SELECT window_start = date_trunc('day', now(), 'Asia/Tokyo')
                 FROM quota.usage WHERE subject = 'tokyo'";
        assert_eq!(one::<bool>(q), Some(true));
        // Changing the plan keeps the time zone unless one is given.
        run("SELECT quota.set_plan('tokyo', 'pro')");
        assert_eq!(
            one::<String>("SELECT time_zone FROM quota.subjects WHERE subject = 'tokyo'"),
            Some("Asia/Tokyo".into())
        );
    }

    #[pg_test]
    fn calendar_windows() {
        let cases = [
            // 2026-11-22 is a Sunday: its week started Monday 2026-11-16.
            (
                "week",
                "UTC",
                "2026-11-22 12:00+00",
                "2026-11-16 00:00+00",
                Some("2026-11-23 00:00+00"),
            ),
            (
                "month",
                "UTC",
                "2026-11-22 12:00+00",
                "2026-11-01 00:00+00",
                Some("2026-12-01 00:00+00"),
            ),
            (
                "year",
                "UTC",
                "2026-11-22 12:00+00",
                "2026-01-01 00:00+00",
                Some("2027-01-01 00:00+00"),
            ),
            (
                "minute",
                "UTC",
                "2026-11-22 12:34:56+00",
                "2026-11-22 12:34+00",
                Some("2026-11-22 12:35+00"),
            ),
            (
                "hour",
                "Asia/Kolkata",
                "2026-11-22 12:34+00",
                "2026-11-22 12:30+00",
                Some("2026-11-22 13:30+00"),
            ),
            // The day DST starts in New York is 23 hours long.
            (
                "day",
                "America/New_York",
                "2026-03-08 12:00-04",
                "2026-03-08 00:00-05",
                Some("2026-03-09 00:00-04"),
            ),
            ("total", "UTC", "2026-11-22 12:00+00", "-infinity", None),
        ];
        for (period, tz, at, start, reset) in cases {
            let q = format!(
                "SELECT window_start = '{start}'::timestamptz AND reset_at IS NOT DISTINCT FROM {}
                 FROM quota.window_bounds('{period}', '{tz}', '{at}')",
                reset.map_or("NULL".to_string(), |r| format!("'{r}'::timestamptz"))
            );
            assert_eq!(one::<bool>(&q), Some(true), "{period} {tz} {at}");
        }
    }

    #[pg_test]
    fn idempotent_replay() {
        run("SELECT quota.set_limit('free', 'api', 'day', 10)");
        let first = one::<i64>("SELECT used FROM quota.consume('gina', 'api', 2, 'req-1')");
        let again = "SELECT used = 2 AND replayed FROM quota.consume('gina', 'api', 2, 'req-1')";
        assert_eq!(first, Some(2));
        assert_eq!(one::<bool>(again), Some(true));
        assert_eq!(
            one::<i64>("SELECT used FROM quota.usage WHERE subject = 'gina'"),
            Some(2)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM quota.audit_log WHERE subject = 'gina'"),
            Some(1)
        );
        // Keys are per subject.
        assert_eq!(
            one::<bool>("SELECT replayed FROM quota.consume('hank', 'api', 2, 'req-1')"),
            Some(false)
        );
    }

    #[pg_test(
        error = "idempotency key \"req-1\" was first used for {\"action\":\"consume\",\"amount\":2,\"metric\":\"api\"}, not for {\"action\":\"consume\",\"amount\":3,\"metric\":\"api\"}"
    )]
    fn idempotency_key_with_other_arguments() {
        run("SELECT quota.set_limit('free', 'api', 'day', 10)");
        run("SELECT quota.consume('gina', 'api', 2, 'req-1')");
        run("SELECT quota.consume('gina', 'api', 3, 'req-1')");
    }

    #[pg_test]
    fn refund_never_goes_below_zero() {
        run("SELECT quota.set_limit('free', 'api', 'day', 10)");
        run("SELECT quota.consume('ivy', 'api', 4)");
        assert_eq!(
            one::<i64>("SELECT used FROM quota.refund('ivy', 'api', 3)"),
            Some(1)
        );
        assert_eq!(
            one::<i64>("SELECT used FROM quota.refund('ivy', 'api', 5)"),
            Some(0)
        );
        assert_eq!(one::<i64>("SELECT remaining FROM quota.status('ivy')"), Some(10));
        let actions =
            one::<String>("SELECT string_agg(action, ',' ORDER BY id) FROM quota.audit_log WHERE success");
        assert_eq!(actions, Some("set_limit,consume,refund,refund".into()));
    }

    #[pg_test]
    fn status_reports_every_metric_and_period() {
        run("SELECT quota.set_limit('free', 'api', 'day', 10)");
        run("SELECT quota.set_limit('free', 'api', 'month', 100)");
        run("SELECT quota.set_limit('free', 'storage', 'total', 5)");
        run("SELECT quota.consume('jack', 'api', 10)");
        let q = "SELECT string_agg(format('%s/%s:%s:%s', metric, period, used, allowed), ' ')
                 FROM quota.status('jack')";
        assert_eq!(
            one::<String>(q),
            Some("api/day:10:f api/month:10:t storage/total:0:t".into())
        );
        assert_eq!(one::<i64>("SELECT sum(used)::bigint FROM quota.usage"), Some(20));
    }

    #[pg_test]
    fn near_limit_lists_highest_ratio_first() {
        run("SELECT quota.set_limit('free', 'api', 'day', 10)");
        run("SELECT quota.consume('k1', 'api', 9)");
        run("SELECT quota.consume('k2', 'api', 10)");
        run("SELECT quota.consume('k3', 'api', 2)");
        let q = "SELECT string_agg(format('%s:%s', subject, ratio), ' ') FROM quota.near_limit(0.8)";
        assert_eq!(one::<String>(q), Some("k2:1 k1:0.9".into()));
        assert_eq!(one::<i64>("SELECT count(*) FROM quota.near_limit(0)"), Some(3));
    }

    #[pg_test]
    fn audit_records_each_decision_and_honours_the_setting() {
        run("SELECT quota.set_limit('free', 'api', 'day', 1)");
        run("SELECT quota.consume('lou', 'api')");
        run("SELECT quota.consume('lou', 'api')");
        let q = "SELECT string_agg(format('%s:%s:%s', action, success, reason), ' ' ORDER BY id)
                 FROM quota.audit_log WHERE subject = 'lou'";
        assert_eq!(
            one::<String>(q),
            Some("consume:t:granted consume:f:limit_reached".into())
        );
        let details = "SELECT string_agg(details::text, ' ' ORDER BY id) FROM quota.audit_log
                       WHERE subject = 'lou'";
        let one_row = r#"{"plan": "free", "used": 1, "limit": 1, "period": "day"}"#;
        assert_eq!(one::<String>(details), Some(format!("{one_row} {one_row}")));
        run("SET LOCAL quota_ext.audit = 'denials'");
        run("SELECT quota.refund('lou', 'api')");
        run("SELECT quota.consume('lou', 'api')");
        run("SELECT quota.consume('lou', 'api')");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM quota.audit_log WHERE subject = 'lou'"),
            Some(3)
        );
        run("SET LOCAL quota_ext.audit = 'off'");
        run("SELECT quota.consume('lou', 'api')");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM quota.audit_log WHERE subject = 'lou'"),
            Some(3)
        );
    }

    #[pg_test]
    fn audit_pages_by_keyset() {
        run("SELECT quota.set_limit('free', 'api', 'day', 100)");
        for _ in 0..5 {
            run("SELECT quota.consume('mia', 'api')");
        }
        run("SELECT quota.consume('other', 'api')");
        let p1 = one::<Vec<i64>>("SELECT array_agg(id) FROM quota.audit_page('mia', NULL, 2)").unwrap();
        let p2 = one::<Vec<i64>>(&format!(
            "SELECT array_agg(id) FROM quota.audit_page('mia', {}, 2)",
            p1[1]
        ))
        .unwrap();
        let p3 = one::<Vec<i64>>(&format!(
            "SELECT array_agg(id) FROM quota.audit_page('mia', {}, 2)",
            p2[1]
        ))
        .unwrap();
        let all = one::<Vec<i64>>(
            "SELECT array_agg(id ORDER BY id DESC) FROM quota.audit_log WHERE subject = 'mia'",
        )
        .unwrap();
        assert_eq!([p1, p2, p3].concat(), all);
        // NULL subject: a trusted caller sees every subject.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM quota.audit_page(NULL, NULL, 1000)"),
            Some(7)
        );
    }

    #[pg_test]
    fn prune_deletes_old_rows_only() {
        run("SELECT quota.set_limit('free', 'api', 'day', 100)");
        run("SELECT quota.consume('ned', 'api', 1, 'k1')");
        run("SELECT quota.consume('ned', 'api', 1, 'k2')");
        run("UPDATE quota.audit_log SET created_at = now() - interval '100 days' WHERE metric = 'api' AND idempotency_key = 'k1'");
        run("UPDATE quota.idempotency_keys SET created_at = now() - interval '8 days' WHERE key = 'k1'");
        let q = "SELECT format('%s,%s', audit_deleted, idempotency_deleted) FROM quota.prune()";
        assert_eq!(one::<String>(q), Some("1,1".into()));
        assert_eq!(one::<i64>("SELECT count(*) FROM quota.idempotency_keys"), Some(1));
    }

    #[pg_test]
    fn reset_usage_returns_windows_deleted() {
        run("SELECT quota.set_limit('free', 'api', 'day', 10)");
        run("SELECT quota.set_limit('free', 'api', 'hour', 10)");
        run("SELECT quota.set_limit('free', 'jobs', 'day', 10)");
        run("SELECT quota.consume('oli', 'api')");
        run("SELECT quota.consume('oli', 'jobs')");
        assert_eq!(one::<i64>("SELECT quota.reset_usage('oli', 'api')"), Some(2));
        assert_eq!(one::<i64>("SELECT quota.reset_usage('oli')"), Some(1));
    }

    #[pg_test(error = "quota exceeded: api of day for subject pat (1/1 used)")]
    fn require_raises_on_denial() {
        run("SELECT quota.set_limit('free', 'api', 'day', 1)");
        run("SELECT quota.require('pat', 'api')");
        run("SELECT quota.require('pat', 'api')");
    }

    #[pg_test(error = "no limit is defined for metric \"nothing\" on plan \"free\" of subject \"quinn\"")]
    fn no_limit_is_an_error() {
        run("SELECT quota.consume('quinn', 'nothing')");
    }

    #[pg_test(error = "unknown period \"fortnight\"")]
    fn unknown_period() {
        run("SELECT quota.set_limit('free', 'api', 'fortnight', 1)");
    }

    #[pg_test(error = "plan \"platinum\" does not exist")]
    fn unknown_plan() {
        run("SELECT quota.set_plan('rob', 'platinum')");
    }

    #[pg_test(error = "amount must not be negative, got -1")]
    fn negative_amount() {
        run("SELECT quota.set_limit('free', 'api', 'day', 1)");
        run("SELECT quota.consume('sam', 'api', -1)");
    }

    #[pg_test(error = "time zone \"Mars/Olympus\" not recognized")]
    fn invalid_time_zone() {
        run("SELECT quota.set_plan('tom', 'free', 'Mars/Olympus')");
    }

    fn batch(owner: &str, item: &str, qty: i64, expires: &str) -> String {
        one::<pgrx::Uuid>(&format!(
            "SELECT id FROM quota.create_batch('{owner}', '{item}', {qty}, {expires})"
        ))
        .unwrap()
        .to_string()
    }

    #[pg_test]
    fn batch_consumption_bumps_the_version() {
        let id = batch("shop", "milk", 10, "NULL");
        let q = format!(
            "SELECT format('%s/%s/%s', consumed, remaining, version)
             FROM quota.consume_batch_quantity('{id}', 3)"
        );
        assert_eq!(one::<String>(&q), Some("3/7/2".into()));
        let q = format!(
            "SELECT format('%s/%s/%s', consumed, remaining, version)
             FROM quota.consume_batch_quantity('{id}', 7, 2)"
        );
        assert_eq!(one::<String>(&q), Some("7/0/3".into()));
        let details = format!(
            "SELECT details->>'version_before' || '->' || (details->>'version_after')
             FROM quota.audit_log WHERE action = 'consume_batch' AND details->>'batch_id' = '{id}'
             ORDER BY id DESC LIMIT 1"
        );
        assert_eq!(one::<String>(&details), Some("2->3".into()));
    }

    #[pg_test(
        error = "insufficient quantity in batch 00000000-0000-0000-0000-000000000001: requested 3, available 2"
    )]
    fn batch_insufficient() {
        run(
            "INSERT INTO quota.batches (id, owner, item, quantity, initial_quantity)
             VALUES ('00000000-0000-0000-0000-000000000001', 'shop', 'milk', 2, 2)",
        );
        run("SELECT quota.consume_batch_quantity('00000000-0000-0000-0000-000000000001', 3)");
    }

    #[pg_test]
    fn consume_item_takes_earliest_expiry_first() {
        let later = batch("shop", "milk", 5, "now() + interval '10 days'");
        let none = batch("shop", "milk", 5, "NULL");
        let soon = batch("shop", "milk", 5, "now() + interval '1 day'");
        let expired = batch("shop", "milk", 5, "now() - interval '1 day'");
        let other_item = batch("shop", "eggs", 5, "now() + interval '1 hour'");
        let got = one::<String>(
            "SELECT string_agg(format('%s:%s', batch_id, consumed), ' ') FROM quota.consume_item('shop', 'milk', 12)",
        );
        assert_eq!(got, Some(format!("{soon}:5 {later}:5 {none}:2")));
        let left = format!(
            "SELECT string_agg(quantity::text, ',' ORDER BY array_position(ARRAY['{soon}','{later}','{none}','{expired}','{other_item}']::uuid[], id))
             FROM quota.batches"
        );
        assert_eq!(one::<String>(&left), Some("0,0,3,5,5".into()));
    }

    #[pg_test]
    fn consume_item_fifo_takes_oldest_first() {
        // created_at is now() for every batch of one transaction: fifo falls back to the id.
        run("SELECT quota.create_batch('shop', 'tea', 5, now() + interval '1 day')");
        run("SELECT quota.create_batch('shop', 'tea', 5, NULL)");
        run("UPDATE quota.batches SET created_at = now() - interval '1 hour' WHERE expires_at IS NULL");
        let oldest = one::<pgrx::Uuid>("SELECT id FROM quota.batches WHERE expires_at IS NULL").unwrap();
        let got =
            one::<pgrx::Uuid>("SELECT batch_id FROM quota.consume_item('shop', 'tea', 2, 'fifo')").unwrap();
        assert_eq!(got, oldest);
    }

    #[pg_test(error = "insufficient quantity in item \"milk\" of owner \"shop\": requested 11, available 10")]
    fn consume_item_is_all_or_nothing() {
        batch("shop", "milk", 5, "NULL");
        batch("shop", "milk", 5, "NULL");
        batch("shop", "milk", 50, "now() - interval '1 minute'");
        run("SELECT quota.consume_item('shop', 'milk', 11)");
    }

    fn metric(name: &str) -> i64 {
        one::<i64>(&format!(
            "SELECT value FROM quota.metrics() WHERE name = '{name}'"
        ))
        .unwrap()
    }

    #[pg_test]
    fn metrics_count_decisions() {
        // Counters are cluster-wide and other tests run beside this one: compare deltas.
        let (c0, d0, r0, p0) = (
            metric("consumes"),
            metric("denials"),
            metric("refunds"),
            metric("idempotent_replays"),
        );
        run("SELECT quota.set_limit('free', 'api', 'day', 2)");
        run("SELECT quota.consume('met', 'api', 1, 'k')");
        run("SELECT quota.consume('met', 'api', 1, 'k')");
        run("SELECT quota.consume('met', 'api', 2)");
        run("SELECT quota.refund('met', 'api')");
        assert!(metric("consumes") - c0 >= 1);
        assert!(metric("denials") - d0 >= 1);
        assert!(metric("refunds") - r0 >= 1);
        assert!(metric("idempotent_replays") - p0 >= 1);
        let text = one::<String>("SELECT quota.metrics_prometheus()").unwrap();
        assert!(
            text.contains("# TYPE quota_ext_consumes_total counter\nquota_ext_consumes_total "),
            "{text}"
        );
        let b0 = (metric("batch_consumes"), metric("insufficient_quantity"));
        let id = batch("shop", "salt", 1, "NULL");
        run(&format!("SELECT quota.consume_batch_quantity('{id}', 1)"));
        assert!(metric("batch_consumes") - b0.0 >= 1);
        // A refusal raises, but the counter (like a sequence) keeps it.
        run(&format!(
            "DO $$ BEGIN PERFORM quota.consume_batch_quantity('{id}', 1); EXCEPTION WHEN check_violation THEN NULL; END $$"
        ));
        assert!(metric("insufficient_quantity") - b0.1 >= 1);
    }

    #[pg_test]
    fn rate_check_passes_exactly_burst() {
        for i in 0..5 {
            let q =
                "SELECT format('%s/%s', allowed, remaining) FROM quota.rate_check('t:burst', 5, '1 minute')";
            assert_eq!(one::<String>(q), Some(format!("t/{}", 4 - i)));
        }
        let q = "SELECT NOT allowed AND remaining = 0 AND rate_limit = 5
                        AND retry_after_seconds BETWEEN 11 AND 12 AND reset_after_seconds BETWEEN 59 AND 60
                 FROM quota.rate_check('t:burst', 5, '1 minute')";
        assert_eq!(one::<bool>(q), Some(true));
        // Other keys are not affected; cost 0 peeks and changes nothing.
        assert_eq!(
            one::<bool>("SELECT allowed FROM quota.rate_check('t:other', 5, '1 minute')"),
            Some(true)
        );
        assert_eq!(
            one::<i64>("SELECT remaining FROM quota.rate_check('t:other', 5, '1 minute', NULL, 0)"),
            Some(4)
        );
        assert_eq!(
            one::<i64>("SELECT remaining FROM quota.rate_check('t:other', 5, '1 minute', NULL, 0)"),
            Some(4)
        );
    }

    #[pg_test]
    fn rate_check_refills_after_retry_after() {
        // 20 per second, burst 1: the next token comes 50 ms later.
        assert_eq!(
            one::<bool>("SELECT allowed FROM quota.rate_check('t:refill', 20, '1 second', 1)"),
            Some(true)
        );
        let retry =
            one::<f64>("SELECT retry_after_seconds FROM quota.rate_check('t:refill', 20, '1 second', 1)")
                .unwrap();
        assert!(retry > 0.0 && retry <= 0.05, "{retry}");
        run(&format!("SELECT pg_sleep({retry})"));
        assert_eq!(
            one::<bool>("SELECT allowed FROM quota.rate_check('t:refill', 20, '1 second', 1)"),
            Some(true)
        );
    }

    #[pg_test]
    fn rate_check_cost_above_burst_never_passes() {
        let q = "SELECT NOT allowed AND retry_after_seconds IS NULL FROM quota.rate_check('t:big', 10, '1 second', 3, 4)";
        assert_eq!(one::<bool>(q), Some(true));
        // It took nothing: the whole burst is still there.
        assert_eq!(
            one::<bool>("SELECT allowed FROM quota.rate_check('t:big', 10, '1 second', 3, 3)"),
            Some(true)
        );
    }

    #[pg_test]
    fn rate_reset_forgets_a_bucket() {
        run("SELECT quota.rate_check('t:reset', 1, '1 hour')");
        assert_eq!(
            one::<bool>("SELECT allowed FROM quota.rate_check('t:reset', 1, '1 hour')"),
            Some(false)
        );
        assert_eq!(one::<bool>("SELECT quota.rate_reset('t:reset')"), Some(true));
        assert_eq!(one::<bool>("SELECT quota.rate_reset('t:reset')"), Some(false));
        assert_eq!(
            one::<bool>("SELECT allowed FROM quota.rate_check('t:reset', 1, '1 hour')"),
            Some(true)
        );
    }

    #[pg_test]
    fn rate_metrics_count_checks_and_keys() {
        let (c0, d0) = (metric("rate_checks"), metric("rate_denials"));
        run("SELECT quota.rate_check('t:m' || i, 1, '1 hour') FROM generate_series(1, 3) i");
        run("SELECT quota.rate_check('t:m1', 1, '1 hour')");
        assert!(metric("rate_checks") - c0 >= 4);
        assert!(metric("rate_denials") - d0 >= 1);
        assert!(metric("keys_in_use") >= 3);
        assert!(metric("key_capacity") >= 100_000);
    }

    #[pg_test(error = "key is 257 bytes long; the maximum is 256")]
    fn rate_check_key_too_long() {
        run("SELECT quota.rate_check(repeat('k', 257), 1)");
    }

    #[pg_test(error = "rate must be positive, got 0")]
    fn rate_check_zero_rate() {
        run("SELECT quota.rate_check('k', 0)");
    }

    #[pg_test(error = "per must be a positive interval, got 00:00:00")]
    fn rate_check_zero_interval() {
        run("SELECT quota.rate_check('k', 1, '0 seconds')");
    }
}
