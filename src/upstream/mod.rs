//! Budgets of upstream APIs (GitHub's 5 000 an hour, a model provider's tokens a minute) that
//! every app worker shares: learned from the upstream's own answers (upstream_observe, from
//! headers such as GitHub's x-ratelimit-*) and spent exactly across all backends
//! (upstream_acquire), never below the reserve of quota.upstreams. State in shared memory, like
//! the rate buckets: not transactional, empty after a restart (nothing known until the next
//! observation), each server its own.

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
use table::Op;

thread_local! {
    /// (the cache generation it was filled under, api -> reserve of quota.upstreams).
    static RESERVES: RefCell<(u64, HashMap<String, i64>)> = RefCell::new((0, HashMap::new()));
}

static RESERVE_LOAD: Stmt = Stmt {
    sql: "SELECT reserve FROM quota.upstreams WHERE api = $1",
    args: &[T::TEXTOID],
};

/// An API's reserve (0 without a row), from the backend cache, dropped with the others when
/// quota.upstreams changes.
fn reserve(api: &str) -> i64 {
    cache::follow_committed_changes();
    let gen = cache::generation();
    let hit = RESERVES.with(|r| {
        let mut r = r.borrow_mut();
        if r.0 != gen {
            *r = (gen, HashMap::new());
        }
        r.1.get(api).copied()
    });
    if let Some(hit) = hit {
        return hit;
    }
    cache::watch_tables();
    let _owner = request::AsOwner::enter();
    let reserve = Spi::connect_mut(|client| {
        spi::run(client, &RESERVE_LOAD, &[api.into()])
            .next()
            .and_then(|row| spi::get::<i64>(&row, 1))
            .unwrap_or(0)
    });
    if cache::generation() == gen {
        cache::note_fill();
        RESERVES.with(|r| {
            let mut r = r.borrow_mut();
            if r.1.len() >= 10_000 {
                r.1.clear();
            }
            r.1.insert(api.to_string(), reserve);
        });
    }
    reserve
}

fn null<T>(what: &'static str, hint: &'static str) -> T {
    QuotaError::NullArgument { what, hint }.raise()
}

fn check_api(api: Option<&str>) -> &str {
    request::check_name("api", api, "Pass the name of the upstream API, e.g. 'github'.").or_raise()
}

fn run(
    fcinfo: pg_sys::FunctionCallInfo,
    api: &str,
    op: Op,
) -> pgrx::composite_type!('static, "quota.upstream_decision") {
    if !table::ready() {
        QuotaError::NotPreloaded.raise();
    }
    let now = crate::pg::now_micros();
    let seen = table::apply(api.as_bytes(), op, now).unwrap_or_else(|_| {
        metrics::count(Counter::UpstreamFull);
        QuotaError::UpstreamsFull { api: api.to_string() }.raise()
    });
    if let Op::Acquire { .. } = op {
        metrics::count(if seen.allowed {
            Counter::UpstreamAcquired
        } else {
            Counter::UpstreamDenied
        });
    }
    let retry = if seen.allowed {
        Some(0.0)
    } else {
        seen.reset_at.map(|r| (r - now).max(0) as f64 / 1e6)
    };
    let reset_at = seen.reset_at.map(pg_sys::Datum::from);
    let datums = [
        seen.allowed.into_datum(),
        api.into_datum(),
        seen.remaining.into_datum(),
        reset_at,
        retry.into_datum(),
    ];
    // SAFETY: the call's own fcinfo, for a function returning quota.upstream_decision, whose
    // descriptor lives in TopMemoryContext (catalog::result_tupdesc); the datums are in its
    // column order and of its column types (reset_at a timestamptz's microseconds).
    unsafe {
        let tupdesc = pgrx::PgTupleDesc::from_pg_unchecked(crate::pg::catalog::result_tupdesc(fcinfo));
        PgHeapTuple::from_datums(tupdesc, datums)
    }
    .unwrap_or_else(|e| pgrx::error!("cannot form quota.upstream_decision: {e}"))
}

/// What the upstream said in its latest answer: `quota_limit` a window, `remaining` left in it,
/// resetting at `reset_at`. A later window replaces the budget; the same window keeps the least
/// of what it holds and what is observed; an earlier one is stale and ignored.
#[pg_extern(volatile, parallel_restricted)]
fn upstream_observe(
    api: Option<&str>,
    quota_limit: Option<i64>,
    remaining: Option<i64>,
    reset_at: Option<TimestampWithTimeZone>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::composite_type!('static, "quota.upstream_decision") {
    let api = check_api(api);
    let limit = quota_limit.unwrap_or_else(|| {
        null(
            "quota_limit",
            "Pass the upstream's limit, e.g. its x-ratelimit-limit header.",
        )
    });
    let remaining = remaining.unwrap_or_else(|| {
        null(
            "remaining",
            "Pass what the upstream says is left, e.g. its x-ratelimit-remaining header.",
        )
    });
    let reset_at = reset_at.unwrap_or_else(|| {
        null(
            "reset_at",
            "Pass when the upstream's window resets, e.g. to_timestamp(x-ratelimit-reset).",
        )
    });
    for (what, v) in [("quota_limit", limit), ("remaining", remaining)] {
        if v < 0 {
            QuotaError::Negative { what, value: v }.raise();
        }
    }
    if remaining > limit {
        QuotaError::OutOfRange {
            what: "remaining",
            value: remaining as f64,
            min: 0.0,
            max: limit as f64,
        }
        .raise();
    }
    let reset_at = reset_at.into_inner();
    if reset_at == i64::MAX || reset_at == i64::MIN {
        QuotaError::BadTimestamp { what: "reset_at" }.raise();
    }
    run(
        fcinfo,
        api,
        Op::Observe {
            limit,
            remaining,
            reset_at,
        },
    )
}

/// Spend `cost` of what the upstream said remains, never below the API's reserve, exactly across
/// all backends; denied until reset_at once spent. An API never observed has no known budget:
/// allowed, remaining NULL.
#[pg_extern(volatile, parallel_restricted)]
fn upstream_acquire(
    api: Option<&str>,
    cost: default!(Option<i64>, 1),
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::composite_type!('static, "quota.upstream_decision") {
    let api = check_api(api);
    let cost = cost
        .ok_or(QuotaError::NullArgument {
            what: "cost",
            hint: "Pass how much of the upstream's budget the call spends, usually 1.",
        })
        .or_raise();
    if cost < 0 {
        QuotaError::Negative {
            what: "cost",
            value: cost,
        }
        .raise();
    }
    let reserve = reserve(api);
    run(fcinfo, api, Op::Acquire { cost, reserve })
}
