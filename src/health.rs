//! quota.health(): one row per thing that can go wrong in shared memory or around it, each with
//! its threshold and a sentence a person can act on.

use crate::metrics;
use crate::pg::guc;
use crate::request;
use pgrx::prelude::*;

/// (check, ok, detail)
type Check = (String, bool, String);

fn row(check: &str, ok: bool, detail: String) -> Check {
    (check.to_string(), ok, detail)
}

fn percent(n: i64, of: i64) -> f64 {
    if of <= 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

/// The checks, from the counters and gauges (shared memory) and the server's settings.
fn checks() -> Vec<Check> {
    if !metrics::preloaded() {
        return vec![row(
            "preload",
            false,
            "quota_ext is not in shared_preload_libraries: rate limits, breakers, upstream budgets, metrics and the audit queue are off. Add it and restart the server.".into(),
        )];
    }
    let mut out = vec![row(
        "preload",
        true,
        "quota_ext is preloaded: its shared memory is in use.".into(),
    )];
    rate_checks(&mut out);
    audit_checks(&mut out);
    other_checks(&mut out);
    out
}

fn v(name: &str) -> i64 {
    metrics::value(name).unwrap_or(0)
}

fn rate_checks(out: &mut Vec<Check>) {
    let (keys, capacity) = (v("keys_in_use"), v("key_capacity"));
    let fill = percent(keys, capacity);
    out.push(row(
        "rate_table_fill",
        fill < 90.0,
        if fill < 90.0 {
            format!("{keys} of {capacity} rate-limit buckets in use ({fill:.0} %); below 90 %.")
        } else {
            format!("{keys} of {capacity} rate-limit buckets in use ({fill:.0} %): new keys will soon evict busy buckets. Raise quota_ext.rate_max_keys (a restart).")
        },
    ));
    let full = v("full_table_events");
    out.push(row(
        "rate_table_full_events",
        full == 0,
        if full == 0 {
            "No new key has found its partition of the bucket table full.".into()
        } else {
            format!("{full} new keys found their partition full with no refilled bucket, and evicted the one that owed least (since the start or reset_metrics()). Raise quota_ext.rate_max_keys (a restart).")
        },
    ));
}

fn audit_checks(out: &mut Vec<Check>) {
    let (depth, size) = (v("audit_queue_depth"), guc::audit_queue_size() as i64);
    let qfill = percent(depth, size);
    out.push(row(
        "audit_queue_fill",
        qfill < 50.0,
        if qfill < 50.0 {
            format!("{depth} of {size} refusal audit rows waiting for the audit writer ({qfill:.0} %); below 50 %.")
        } else {
            format!("{depth} of {size} refusal audit rows waiting ({qfill:.0} %): the writer is not keeping up or cannot start. Check the server log for the audit writer, max_worker_processes, and raise quota_ext.audit_queue_size (a restart).")
        },
    ));
    let (dropped, rejected) = (v("audit_dropped"), v("audit_rejected"));
    out.push(row(
        "audit_rows_lost",
        dropped == 0 && rejected == 0,
        if dropped == 0 && rejected == 0 {
            "No refusal audit row was lost.".into()
        } else {
            format!("{dropped} queued refusal audit rows were dropped (their database was gone, or the writer failed: see the server log) and {rejected} found the queue full (raise quota_ext.audit_queue_size, a restart), since the start or reset_metrics().")
        },
    ));
    let stranded = crate::audit::writer::stranded_since().map(crate::quota::decision::iso8601);
    let workers = max_worker_processes();
    out.push(row(
        "audit_writers",
        stranded.is_none() && workers > 0,
        match (stranded, workers) {
            (_, 0) => "max_worker_processes is 0: the audit writer can never start, and refusal audit rows only queue. Raise max_worker_processes (a restart).".into(),
            (Some(since), _) => format!("Queued refusal audit rows have waited for a background worker slot since {since}: raise max_worker_processes (parallel query shares them), a restart."),
            (None, n) => format!("The audit writer can start (max_worker_processes = {n}) and no row waits for a slot."),
        },
    ));
}

fn other_checks(out: &mut Vec<Check>) {
    let open = v("breakers_open");
    out.push(row(
        "breakers_open",
        open == 0,
        if open == 0 {
            "No circuit breaker is open.".into()
        } else {
            format!("{open} circuit breakers are open: their services failed quota.breakers' failure_threshold times in a row. quota.breaker_allow(name) says for how long; quota.breaker_reset(name) closes one.")
        },
    ));

    let (lookups, invalidations) = (v("cache_lookups"), v("cache_invalidations"));
    let churning = lookups >= 500 && invalidations * 2 >= lookups;
    out.push(row(
        "cache_churn",
        !churning,
        if churning {
            format!("The backend caches were dropped {invalidations} times for {lookups} calls that use them: plans, limits, subjects, overrides or policies are written so often that calls keep reloading them (set_plan or set_limit on the request path?). Write them when they change, not on every request.")
        } else {
            format!("{lookups} calls used the backend caches, which were dropped {invalidations} times: they are doing their work.")
        },
    ));
}

fn max_worker_processes() -> i64 {
    // SAFETY: reads a postmaster setting's C variable, set at start-up.
    unsafe { pgrx::pg_sys::max_worker_processes as i64 }
}

/// The health of quota_ext's shared state, one row per check: whether it is ok, and a sentence
/// saying what to do when it is not (trusted callers and service_role).
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn health() -> Result<
    TableIterator<'static, (name!(check, String), name!(ok, bool), name!(detail, String))>,
    pgrx::pg_sys::panic::ErrorReport,
> {
    request::require_trusted("quota.health")?;
    Ok(TableIterator::new(checks()))
}
