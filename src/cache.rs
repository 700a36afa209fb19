//! Per-backend caches for the consume path: each subject's limits for a metric, and calendar
//! windows per time zone and period. The hot path then runs no lookup query at all.
//!
//! Invalidation uses PostgreSQL's own mechanism, so it needs no shared memory: a statement
//! trigger on quota.limits, quota.overrides, quota.subjects and quota.plans queues a relcache
//! invalidation of that table, which PostgreSQL delivers to every backend when the writing
//! transaction commits (and applies at once inside the writing transaction, and undoes if it
//! aborts). Each backend drops its limits cache when such a message names one of those tables,
//! or when it lost track of messages (relid = InvalidOid).

use crate::catalog;
use crate::decision::now_micros;
use crate::error::{QuotaError, Result};
use crate::spi::{self, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// Bound on cached subjects per backend; the cache starts over when it is reached.
const MAX_ENTRIES: usize = 50_000;

pub struct Limits {
    pub plan: String,
    pub time_zone: String,
    /// (period, max_amount), sorted by period length.
    pub periods: Vec<(String, i64)>,
}

thread_local! {
    static LIMITS: RefCell<HashMap<String, Rc<Limits>>> = RefCell::new(HashMap::new());
    static WINDOWS: RefCell<HashMap<(String, String), (i64, Option<i64>)>> = RefCell::new(HashMap::new());
    /// OIDs of the tables whose changes empty LIMITS (0 = not known yet).
    static WATCHED: Cell<[u32; 4]> = const { Cell::new([0; 4]) };
}

/// Relcache invalidation callback. Runs inside invalidation processing: it must not touch the
/// catalogs, so it compares against OIDs remembered when the cache was filled.
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let id = relid.to_u32();
    if id == 0 || WATCHED.with(|w| w.get().contains(&id)) {
        LIMITS.with(|l| l.borrow_mut().clear());
    }
}

pub fn init() {
    // SAFETY: registers a callback for this process; called once from _PG_init.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        );
    }
}

fn remember_watched_tables() {
    let (nsp, _) = catalog::quota_schema();
    let mut ids = [0u32; 4];
    for (i, name) in [c"limits", c"overrides", c"subjects", c"plans"]
        .iter()
        .enumerate()
    {
        // SAFETY: syscache lookup by NUL-terminated name and namespace OID.
        ids[i] = unsafe { pg_sys::get_relname_relid(name.as_ptr(), nsp) }.to_u32();
    }
    WATCHED.with(|w| w.set(ids));
}

/// Limits of the subject's plan for one metric, overrides replacing them, and the subject's
/// time zone. Periods without a limit are left out; an empty list means "no limit".
static LOAD: Stmt = Stmt {
    sql: "
SELECT s.plan, s.tz, p.period, p.max_amount
  FROM (SELECT coalesce(sj.plan, $3) AS plan, coalesce(sj.time_zone, 'UTC') AS tz
          FROM (SELECT) AS one LEFT JOIN quota.subjects AS sj ON sj.subject = $1) AS s
  LEFT JOIN LATERAL (
        SELECT o.period, o.max_amount FROM quota.overrides AS o
         WHERE o.subject = $1 AND o.metric = $2
        UNION ALL
        SELECT l.period, l.max_amount FROM quota.limits AS l
         WHERE l.plan = s.plan AND l.metric = $2
           AND NOT EXISTS (SELECT FROM quota.overrides AS o
                            WHERE o.subject = $1 AND o.metric = $2 AND o.period = l.period)
       ) AS p ON true
 ORDER BY pg_catalog.array_position('{minute,hour,day,week,month,year,total}'::text[], p.period)",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID],
};

pub fn limits(
    client: &mut SpiClient<'_>,
    subject: &str,
    metric: &str,
    default_plan: &str,
) -> Result<Rc<Limits>> {
    // The default plan is part of the key: it is a setting that can differ per session.
    let key = format!("{subject}\u{0}{metric}\u{0}{default_plan}");
    if let Some(hit) = LIMITS.with(|l| l.borrow().get(&key).cloned()) {
        return Ok(hit);
    }
    if WATCHED.with(|w| w.get()[0]) == 0 {
        remember_watched_tables();
    }
    let mut plan = default_plan.to_string();
    let mut time_zone = "UTC".to_string();
    let mut periods = Vec::new();
    for row in spi::run(
        client,
        &LOAD,
        &[subject.into(), metric.into(), default_plan.into()],
    ) {
        plan = spi::get::<String>(&row, 1).expect("plan");
        time_zone = spi::get::<String>(&row, 2).expect("time zone");
        if let Some(period) = spi::get::<String>(&row, 3) {
            periods.push((period, spi::get::<i64>(&row, 4).expect("max_amount")));
        }
    }
    if periods.is_empty() {
        // Not cached: the usual fix is to define the limit, which must take effect at once.
        return Err(QuotaError::NoLimit {
            subject: subject.into(),
            metric: metric.into(),
            plan,
        });
    }
    let entry = Rc::new(Limits {
        plan,
        time_zone,
        periods,
    });
    LIMITS.with(|l| {
        let mut l = l.borrow_mut();
        if l.len() >= MAX_ENTRIES {
            l.clear();
        }
        l.insert(key, entry.clone());
    });
    Ok(entry)
}

static WINDOW: Stmt = Stmt {
    sql: "SELECT window_start, reset_at FROM quota.window_bounds($1, $2)",
    args: &[T::TEXTOID, T::TEXTOID],
};

/// The window of `period` in `time_zone` that contains the transaction's now(): reused until it
/// ends, so a backend asks PostgreSQL once per window.
pub fn window(client: &mut SpiClient<'_>, period: &str, time_zone: &str) -> (i64, Option<i64>) {
    if period == "total" {
        return (i64::MIN, None);
    }
    let now = now_micros();
    let key = (time_zone.to_string(), period.to_string());
    if let Some((start, reset)) = WINDOWS.with(|w| w.borrow().get(&key).copied()) {
        if start <= now && reset.is_some_and(|r| now < r) {
            return (start, reset);
        }
    }
    let row = spi::run(client, &WINDOW, &[period.into(), time_zone.into()])
        .next()
        .expect("one window");
    let start = spi::get::<TimestampWithTimeZone>(&row, 1)
        .expect("window_start")
        .into_inner();
    let reset = spi::get::<TimestampWithTimeZone>(&row, 2).map(|t| t.into_inner());
    WINDOWS.with(|w| {
        let mut w = w.borrow_mut();
        if w.len() >= 10_000 {
            w.clear();
        }
        w.insert(key, (start, reset));
    });
    (start, reset)
}

/// Trigger on the tables the limits cache is built from: queue a relcache invalidation of the
/// table, delivered to every backend at commit. (A module of its own: #[pg_trigger] expands to
/// code that names `Result`, which must be the standard one.)
mod trigger {
    use pgrx::prelude::*;
    use pgrx::{pg_sys, PgTrigger, PgTriggerError};

    #[pg_trigger]
    fn invalidate_limits_cache<'a>(
        trigger: &'a PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, PgTriggerError> {
        // SAFETY: queues an invalidation message for the OID of the trigger's own table.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(trigger.relation()?.oid()) };
        Ok(None)
    }
}
