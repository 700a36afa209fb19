//! Decision latency: every timed function's calls land in its histogram, quota.latency()
//! and metrics_prometheus() agree, the setting turns timing off.

use quota_ext_itests::{one_i64, one_text, TestDb};

fn calls(c: &mut postgres::Client, function: &str) -> i64 {
    one_i64(
        c,
        &format!("SELECT calls FROM quota.latency() WHERE function = '{function}'"),
    )
}

#[test]
fn each_function_is_timed_and_both_views_agree() {
    let db = TestDb::new("latency");
    let mut c = db.connect();
    c.batch_execute("SELECT quota.set_limit('free', 'api', 'day', 1000)")
        .unwrap();
    let batch = one_text(
        &mut c,
        "SELECT id::text FROM quota.create_batch('shop', 'milk', 100)",
    );
    let before: Vec<i64> = [
        "consume",
        "require",
        "refund",
        "rate_check",
        "rate_limit",
        "consume_batch_quantity",
        "consume_item",
        "breaker_allow",
    ]
    .iter()
    .map(|f| calls(&mut c, f))
    .collect();
    c.batch_execute(&format!(
        "SELECT quota.consume('lat', 'api') FROM generate_series(1, 10);
         SELECT quota.require('lat', 'api');
         SELECT quota.refund('lat', 'api');
         SELECT quota.rate_check('lat', 100, '1 second') FROM generate_series(1, 10);
         SELECT quota.rate_limit('default', 'lat');
         SELECT quota.consume_batch_quantity('{batch}', 1);
         SELECT quota.consume_item('shop', 'milk', 1);
         SELECT quota.breaker_allow('lat');"
    ))
    .unwrap();
    let after: Vec<i64> = [
        "consume",
        "require",
        "refund",
        "rate_check",
        "rate_limit",
        "consume_batch_quantity",
        "consume_item",
        "breaker_allow",
    ]
    .iter()
    .map(|f| calls(&mut c, f))
    .collect();
    let grew: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    // (other databases of the server may call at the same time: at least what we called)
    for (f, (g, want)) in [
        "consume",
        "require",
        "refund",
        "rate_check",
        "rate_limit",
        "consume_batch_quantity",
        "consume_item",
        "breaker_allow",
    ]
    .iter()
    .zip(grew.iter().zip([10, 1, 1, 10, 1, 1, 1, 1]))
    {
        assert!(*g >= want, "{f}: {g} calls timed, {want} made");
    }
    let r = c
        .query_one(
            "SELECT mean_ms, p50_ms, p95_ms, p99_ms FROM quota.latency() WHERE function = 'consume'",
            &[],
        )
        .unwrap();
    let (mean, p50, p95, p99): (f64, f64, f64, f64) = (r.get(0), r.get(1), r.get(2), r.get(3));
    assert!(
        mean > 0.0 && p50 > 0.0 && p50 <= p95 && p95 <= p99 && p99 < 10_000.0,
        "{mean} {p50} {p95} {p99}"
    );
    // The Prometheus histogram: cumulative buckets ending at +Inf = _count.
    let text = one_text(&mut c, "SELECT quota.metrics_prometheus()");
    assert!(text.contains("# TYPE quota_ext_decision_seconds histogram"));
    let count_line = text
        .lines()
        .find(|l| l.starts_with("quota_ext_decision_seconds_count{function=\"rate_check\"}"))
        .unwrap();
    let inf_line = text
        .lines()
        .find(|l| l.starts_with("quota_ext_decision_seconds_bucket{function=\"rate_check\",le=\"+Inf\"}"))
        .unwrap();
    assert_eq!(count_line.rsplit(' ').next(), inf_line.rsplit(' ').next());
    // Turned off, a backend times nothing.
    c.batch_execute("SET quota_ext.latency = off").unwrap();
    let n = calls(&mut c, "rate_check");
    c.batch_execute("SELECT quota.rate_check('lat-off', 100, '1 second') FROM generate_series(1, 50)")
        .unwrap();
    assert!(
        calls(&mut c, "rate_check") - n < 50,
        "the 50 calls were not timed"
    );
}
