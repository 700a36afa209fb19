//! The answer of a rate check, `quota.rate_decision`, built directly as a heap tuple, and the
//! entry points that check a named key (`rate_check`, `rate_reset`).

use super::gcra::Gcra;
use super::table::check;
use super::table::require_ready;
use super::table::reset;
use super::table::Kind;
use super::table::MAX_KEY_BYTES;
use crate::metrics::{self, Counter};
use crate::pg::error::{OrRaise, QuotaError};
use crate::request;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata as sql_meta;
use pgrx::prelude::*;

/// A `quota.rate_decision` formed in one step and handed to PostgreSQL as it is. pgrx's
/// composite return (`PgHeapTuple`) collects the values into two vectors, forms the tuple and
/// then copies it once more into the result datum: work of the size of the whole rate check.
pub struct RateDecision(pg_sys::Datum);

// SAFETY: the datum is a composite of the function's declared result type, formed in the
// call's memory context (see decision_row).
unsafe impl pgrx::callconv::BoxRet for RateDecision {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut pgrx::callconv::FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        // SAFETY: returned from the function the datum was formed for.
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

// SAFETY: the SQL type named is the one every RateDecision is formed as.
unsafe impl sql_meta::SqlTranslatable for RateDecision {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(RateDecision);
    const TYPE_ORIGIN: sql_meta::TypeOrigin = sql_meta::TypeOrigin::External;
    const ARGUMENT_SQL: Result<sql_meta::SqlMappingRef, sql_meta::ArgumentError> =
        Err(sql_meta::ArgumentError::NotValidAsArgument("RateDecision"));
    const RETURN_SQL: Result<sql_meta::ReturnsRef, sql_meta::ReturnsError> = Ok(sql_meta::ReturnsRef::One(
        sql_meta::SqlMappingRef::literal("quota.rate_decision"),
    ));
}

pub fn decision_row(fcinfo: pg_sys::FunctionCallInfo, key: &str, burst: i64, g: &Gcra) -> RateDecision {
    let secs = |ns: i64| ns as f64 / 1e9;
    let retry = g.retry_after_ns.map(|r| secs(r.max(0)));
    let mut values = [
        g.allowed.into_datum(),
        key.into_datum(),
        burst.into_datum(),
        g.remaining.into_datum(),
        secs(g.reset_after_ns.max(0)).into_datum(),
        retry.into_datum(),
    ]
    .map(|d| d.unwrap_or(pg_sys::Datum::from(0)));
    let mut nulls = [false, false, false, false, false, retry.is_none()];
    // SAFETY: fcinfo is this call's, for a function returning quota.rate_decision, whose
    // descriptor result_tupdesc keeps for the life of the backend; the six values are in its
    // column order and of its column types. heap_form_tuple fills in the composite datum's
    // header (length, type, typmod), and no value is a toast pointer (the key is a fresh
    // in-memory text), so the tuple's data is the result datum as it is (what
    // HeapTupleGetDatum returns without toast pointers).
    unsafe {
        let tupdesc = crate::pg::catalog::result_tupdesc(fcinfo);
        let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        RateDecision(pg_sys::Datum::from((*tuple).t_data))
    }
}

/// A call's cost: 1 when NULL, never negative (0 peeks).
pub fn check_cost(cost: Option<i64>) -> Result<i64, QuotaError> {
    match cost.unwrap_or(1) {
        c if c < 0 => Err(QuotaError::Negative {
            what: "cost",
            value: c,
        }),
        c => Ok(c),
    }
}

pub fn check_rate_key(key: Option<&str>) -> Result<&str, QuotaError> {
    let key = key.ok_or(QuotaError::NullArgument {
        what: "key",
        hint: "Pass the key to limit, e.g. 'user:42'.",
    })?;
    if key.is_empty() {
        return Err(QuotaError::EmptyArgument { what: "key" });
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(QuotaError::TooLong {
            what: "key",
            len: key.len(),
            max: MAX_KEY_BYTES,
        });
    }
    Ok(key)
}

/// Check (and take) `cost` tokens from the bucket of `key`: `rate` tokens per `per`, holding at
/// most `burst` (default `rate`). `cost` 0 peeks. A denied call changes nothing.
#[pg_extern(volatile, parallel_safe)]
fn rate_check(
    key: Option<&str>,
    rate: Option<i64>,
    per: default!(Option<Interval>, "'1 second'"),
    burst: default!(Option<i64>, "NULL"),
    cost: default!(Option<i64>, 1),
    fcinfo: pg_sys::FunctionCallInfo,
) -> RateDecision {
    let timer = crate::latency::Timer::start(crate::latency::Func::RateCheck);
    require_ready();
    let key = check_rate_key(key).or_raise();
    let (t, burst) = crate::rate::policy::rate_params(rate, per, burst).or_raise();
    let cost = check_cost(cost).or_raise();
    let g = check(key.as_bytes(), Kind::Check, t, burst, cost, timer.now());
    metrics::count(Counter::RateChecks);
    if !g.allowed {
        metrics::count(Counter::RateDenials);
    }
    decision_row(fcinfo, key, burst, &g)
}

/// Forget a key's bucket (trusted callers only). True when there was one.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn rate_reset(key: Option<&str>) -> bool {
    request::require_trusted("quota.rate_reset").or_raise();
    require_ready();
    let key = check_rate_key(key).or_raise();
    reset(key.as_bytes())
}
