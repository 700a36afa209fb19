//! Circuit breakers shared by every backend, and so by every app server: the seed's
//! CircuitBreaker (closed, open, half-open) with its state in shared memory. Like the rate
//! buckets they are not transactional (a failure recorded stays recorded if the caller's
//! transaction rolls back) and start closed after a restart; each server, a hot standby too,
//! keeps its own.

pub mod table;

use crate::metrics::{self, Counter};
use crate::pg::error::{OrRaise, QuotaError};
use crate::pg::spi::{self, Stmt};
use crate::quota::cache;
use crate::request;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgBuiltInOids as T;
use std::cell::RefCell;
use std::collections::HashMap;
use table::{Op, Rules};

/// The seed's numbers: 5 failures open a breaker, 60 s later one probe is let through.
const DEFAULT_RULES: Rules = Rules {
    failure_threshold: 5,
    open_ns: 60_000_000_000,
    half_open_probes: 1,
};

thread_local! {
    /// (the cache generation it was filled under, name -> rules of quota.breakers).
    static RULES: RefCell<(u64, HashMap<String, Rules>)> = RefCell::new((0, HashMap::new()));
}

static RULES_LOAD: Stmt = Stmt {
    sql: "SELECT failure_threshold, open_seconds, half_open_probes FROM quota.breakers WHERE name = $1",
    args: &[T::TEXTOID],
};

/// A breaker's rules: its row of quota.breakers, or the defaults; from the backend cache,
/// dropped with the others when quota.breakers changes (cache::generation).
fn rules(name: &str) -> Rules {
    cache::follow_committed_changes();
    let gen = cache::generation();
    let hit = RULES.with(|r| {
        let mut r = r.borrow_mut();
        if r.0 != gen {
            *r = (gen, HashMap::new());
        }
        r.1.get(name).copied()
    });
    if let Some(hit) = hit {
        return hit;
    }
    cache::watch_tables();
    let _owner = request::AsOwner::enter();
    let rules = Spi::connect_mut(|client| {
        spi::run(client, &RULES_LOAD, &[name.into()])
            .next()
            .map(|row| Rules {
                failure_threshold: spi::get::<i32>(&row, 1).unwrap_or(5).max(1) as u64,
                open_ns: (spi::get::<f64>(&row, 2).unwrap_or(60.0) * 1e9).clamp(1.0, i64::MAX as f64) as i64,
                half_open_probes: spi::get::<i32>(&row, 3).unwrap_or(1).max(1) as u64,
            })
            .unwrap_or(DEFAULT_RULES)
    });
    if cache::generation() == gen {
        cache::note_fill();
        RULES.with(|r| {
            let mut r = r.borrow_mut();
            if r.1.len() >= 10_000 {
                r.1.clear();
            }
            r.1.insert(name.to_string(), rules);
        });
    }
    rules
}

type BreakerDecision = pgrx::composite_type!('static, "quota.breaker_decision");

fn check_name(name: Option<&str>) -> &str {
    request::check_name(
        "name",
        name,
        "Pass the name of the service the breaker guards, e.g. 'payments-api'.",
    )
    .or_raise()
}

fn require_ready() {
    if !table::ready() {
        QuotaError::NotPreloaded.raise();
    }
}

fn run(fcinfo: pg_sys::FunctionCallInfo, name: &str, op: Op) -> BreakerDecision {
    require_ready();
    let rules = if op == Op::Reset {
        DEFAULT_RULES
    } else {
        rules(name)
    };
    let seen = table::apply(name.as_bytes(), rules, op, crate::pg::monotonic_ns()).unwrap_or_else(|_| {
        metrics::count(Counter::BreakerFull);
        QuotaError::BreakersFull {
            name: name.to_string(),
        }
        .raise()
    });
    if seen.opened {
        metrics::count(Counter::BreakerOpened);
    }
    if op == Op::Allow {
        metrics::count(if seen.allowed {
            Counter::BreakerAllowed
        } else {
            Counter::BreakerDenied
        });
    }
    let retry = seen.retry_after_ns.max(0) as f64 / 1e9;
    let datums = [
        seen.allowed.into_datum(),
        name.into_datum(),
        seen.state.name().into_datum(),
        (seen.failures.min(i32::MAX as u64) as i32).into_datum(),
        retry.into_datum(),
    ];
    // SAFETY: the call's own fcinfo, for a function returning quota.breaker_decision; the
    // descriptor lives in TopMemoryContext (catalog::result_tupdesc), so it is wrapped without
    // reference counting. The datums are in the type's column order and of its column types.
    unsafe {
        let tupdesc = pgrx::PgTupleDesc::from_pg_unchecked(crate::pg::catalog::result_tupdesc(fcinfo));
        PgHeapTuple::from_datums(tupdesc, datums)
    }
    .unwrap_or_else(|e| pgrx::error!("cannot form quota.breaker_decision: {e}"))
}

/// Whether the caller may call the service behind breaker `name` now: closed, yes; open, no,
/// until open_seconds have passed since it opened; half-open, only the first
/// half_open_probes callers across the whole server.
#[pg_extern(volatile, parallel_restricted)]
fn breaker_allow(
    name: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::composite_type!('static, "quota.breaker_decision") {
    let _timer = crate::latency::Timer::start(crate::latency::Func::BreakerAllow);
    run(fcinfo, check_name(name), Op::Allow)
}

/// The outcome of a call to the service: a failure counts toward opening (and in half-open
/// opens it again), a success closes it.
#[pg_extern(volatile, parallel_restricted)]
fn breaker_record(
    name: Option<&str>,
    success: Option<bool>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::composite_type!('static, "quota.breaker_decision") {
    let name = check_name(name);
    let success = success
        .ok_or(QuotaError::NullArgument {
            what: "success",
            hint: "Pass true when the call to the service succeeded, false when it failed.",
        })
        .or_raise();
    run(fcinfo, name, Op::Record { success })
}

/// Close a breaker and forget its failures (trusted callers).
#[pg_extern(volatile, parallel_restricted)]
fn breaker_reset(
    name: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::composite_type!('static, "quota.breaker_decision") {
    request::require_trusted("quota.breaker_reset").or_raise();
    run(fcinfo, check_name(name), Op::Reset)
}
