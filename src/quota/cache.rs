//! Per-backend caches for the consume path: limits per plan and metric, each subject's plan,
//! time zone and overrides, and calendar windows per time zone and period. With warm caches the
//! consume path runs no look-up query at all.
//!
//! Invalidation: a statement trigger on quota.limits, quota.overrides, quota.subjects,
//! quota.plans and quota.rate_policies does two things.
//! - It queues a relcache invalidation of its table, which PostgreSQL delivers to every backend
//!   when the writing transaction commits (and applies at once inside the writing transaction,
//!   and undoes if it aborts); it is also replayed on hot standbys. Each backend drops these
//!   caches when such a message names one of those tables, or when it lost track of messages
//!   (relid = InvalidOid). A backend reads these messages only at its next transaction start or
//!   lock acquisition, though, and a warm call takes no lock.
//! - With the preload, it marks the transaction, and after the commit (once it is visible) the
//!   backend bumps a generation counter in shared memory. Every call that uses the caches first
//!   compares that counter with the value its backend last saw (one atomic load) and drops the
//!   caches when it moved: a change applies to the next call of every backend of the server,
//!   also inside a transaction that was already open.
//!
//! The administrative functions (set_plan, set_limit, set_override, set_parent) and
//! quota.invalidate_cache() do the same by themselves (note_change), so that they apply at once
//! where the triggers are gone: Citus refuses tables with triggers as reference tables, and
//! quota.citus_prepare() drops them. There a direct change of the tables applies within
//! quota_ext.cache_ttl, after which every backend drops its caches.

use crate::pg::catalog;

use crate::pg::now_micros;
use crate::pg::spi::{self, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;
use pgrx::{pg_shmem_init, PgAtomic};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bound on cached subjects per backend; the cache starts over when it is reached.
const MAX_SUBJECTS: usize = 50_000;

/// What the consume path needs to know about one subject and metric.
pub struct SubjectLimits {
    pub plan: String,
    pub time_zone: String,
    /// (period, max_amount), shortest period first.
    pub periods: Vec<(String, i64)>,
}

/// A subject's row in quota.subjects (if any) and its overrides.
pub struct Subject {
    /// It has a row in quota.subjects.
    pub exists: bool,
    plan: Option<String>,
    time_zone: String,
    /// quota.subjects.parent.
    pub parent: Option<String>,
    /// quota.subjects.detached: set_parent(subject, NULL) said it has no parent, so a JWT
    /// claim names none either.
    pub detached: bool,
    /// (metric, period, max_amount)
    overrides: Vec<(String, String, i64)>,
}

thread_local! {
    /// (plan, metric) -> limits of that plan, shortest period first.
    static PLAN_LIMITS: RefCell<HashMap<String, Rc<Vec<(String, i64)>>>> = RefCell::new(HashMap::new());
    static SUBJECTS: RefCell<HashMap<String, Rc<Subject>>> = RefCell::new(HashMap::new());
    /// Whether quota.subjects and quota.overrides hold no row at all: then no subject needs a
    /// look-up.
    static TABLES_EMPTY: Cell<Option<(bool, bool)>> = const { Cell::new(None) };
    static WINDOWS: RefCell<HashMap<(String, String), (i64, Option<i64>)>> = RefCell::new(HashMap::new());
    /// Every plan of quota.plans (None: not loaded), for the JWT claim app_metadata.plan, which
    /// counts only when it names one.
    static PLANS: RefCell<Option<Rc<std::collections::HashSet<String>>>> = const { RefCell::new(None) };
    /// OIDs of the tables whose changes empty the caches above (0 = not known yet).
    static WATCHED: Cell<[u32; 8]> = const { Cell::new([0; 8]) };
    /// Bumped by every invalidation that empties the caches. A loader notes it before its query
    /// and caches the result only if it did not move: an invalidation processed while the query
    /// ran (lock acquisitions during executor start-up process them) may concern a commit the
    /// query's snapshot did not see.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: the name is unique to this extension.
static CONFIG_GENERATION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"quota_ext_config_generation") };

thread_local! {
    /// CONFIG_GENERATION as this backend last saw it.
    static SEEN_CONFIG: Cell<u64> = const { Cell::new(0) };
    /// This transaction changed a table the caches are built from.
    static CHANGED_IN_XACT: Cell<bool> = const { Cell::new(false) };
    /// When the caches were last emptied (pg::monotonic_ns), for quota_ext.cache_ttl.
    static EMPTIED_AT: Cell<i64> = const { Cell::new(0) };
    /// This transaction filled a cache from its own snapshot (REPEATABLE READ or SERIALIZABLE),
    /// which can predate changes committed since: the caches are emptied when it ends.
    static FILLED_FROM_OLD_SNAPSHOT: Cell<bool> = const { Cell::new(false) };
}

/// Note a cache fill. At READ COMMITTED each of the extension's statements takes a new
/// snapshot, so what it read was the newest committed state when it ran (and a change
/// committed since moves the generation on); at REPEATABLE READ and SERIALIZABLE it reads the
/// transaction's snapshot, which may be older than the newest change, so the fill lives only
/// until the transaction ends.
pub fn note_fill() {
    // SAFETY: reads a backend-local global.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        FILLED_FROM_OLD_SNAPSHOT.with(|f| f.set(true));
    }
}

/// Drop the caches if any backend committed a change to their tables since this backend last
/// looked, or they are older than quota_ext.cache_ttl. One atomic load (and a clock reading
/// with a ttl); no generation without the preload (relcache invalidation still applies).
pub fn follow_committed_changes() {
    let ttl = crate::pg::guc::cache_ttl_ns();
    if ttl > 0 {
        expire(ttl);
    }
    if !crate::metrics::preloaded() {
        return;
    }
    crate::metrics::count(crate::metrics::Counter::CacheLookups);
    let now = CONFIG_GENERATION.get().load(Ordering::Acquire);
    if SEEN_CONFIG.with(|s| s.replace(now)) != now {
        forget_limits();
    }
}

/// After a commit that changed the tables (and is visible to new snapshots by then), move the
/// shared generation on. Only atomics and flags here: nothing may fail after a commit. A
/// prepared transaction's change is left to relcache invalidation, delivered by COMMIT
/// PREPARED.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_ABORT
            | XACT_EVENT_PREPARE
    ) && FILLED_FROM_OLD_SNAPSHOT.with(|f| f.replace(false))
    {
        forget_limits();
    }
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            if CHANGED_IN_XACT.with(|c| c.replace(false)) && crate::metrics::preloaded() {
                CONFIG_GENERATION.get().fetch_add(1, Ordering::Release);
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            CHANGED_IN_XACT.with(|c| c.set(false));
        }
        _ => {}
    }
}

/// Drop the caches once they are older than `ttl` nanoseconds. Not counted as an
/// invalidation (cache_invalidations, which health's cache_churn reads): an expiry says
/// nothing about writes on the request path.
fn expire(ttl: i64) {
    if crate::pg::monotonic_ns().saturating_sub(EMPTIED_AT.with(|e| e.get())) >= ttl {
        drop_caches();
    }
}

/// This transaction changed `tables` (names in the extension's schema) without their
/// triggers, or wants every cache rebuilt: queue what the trigger queues (see the module
/// comment). The tables must exist.
pub fn note_change(tables: &[&std::ffi::CStr]) {
    let (nsp, _) = catalog::quota_schema();
    for name in tables {
        // SAFETY: syscache lookup by NUL-terminated name and namespace OID; queues an
        // invalidation message for an existing table's OID.
        unsafe {
            let relid = pg_sys::get_relname_relid(name.as_ptr(), nsp);
            if relid != pg_sys::InvalidOid {
                pg_sys::CacheInvalidateRelcacheByRelid(relid);
            }
        }
    }
    CHANGED_IN_XACT.with(|c| c.set(true));
}

/// The tables the caches are built from.
const WATCHED_TABLES: [&std::ffi::CStr; 8] = [
    c"limits",
    c"overrides",
    c"subjects",
    c"plans",
    c"rate_policies",
    c"breakers",
    c"rate_routes",
    c"upstreams",
];

/// Make every backend of this server drop its configuration caches when this transaction
/// commits (this one's at once): after a direct change of the tables where their triggers are
/// gone (quota.citus_prepare()). Trusted callers only.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn invalidate_cache() -> std::result::Result<(), pgrx::pg_sys::panic::ErrorReport> {
    crate::request::require_trusted("quota.invalidate_cache")?;
    note_change(&WATCHED_TABLES);
    Ok(())
}

fn forget_limits() {
    crate::metrics::count(crate::metrics::Counter::CacheInvalidations);
    drop_caches();
}

fn drop_caches() {
    EMPTIED_AT.with(|e| e.set(crate::pg::monotonic_ns()));
    PLAN_LIMITS.with(|l| l.borrow_mut().clear());
    SUBJECTS.with(|l| l.borrow_mut().clear());
    TABLES_EMPTY.with(|t| t.set(None));
    PLANS.with(|p| *p.borrow_mut() = None);
    // Resolved again on next use: the tables may have been dropped and created anew.
    WATCHED.with(|w| w.set([0; 8]));
    GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
}

/// Moves on whenever the caches built from quota_ext's tables are dropped: a cache kept
/// elsewhere (the rate policies) that notes it when filled is stale once it moved.
pub fn generation() -> u64 {
    GENERATION.with(|g| g.get())
}

/// Relcache invalidation callback. Runs inside invalidation processing: it must not touch the
/// catalogs, so it compares against OIDs remembered when the cache was filled.
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let id = relid.to_u32();
    if id == 0 || WATCHED.with(|w| w.get().contains(&id)) {
        forget_limits();
    }
}

pub fn init() {
    // SAFETY: registers callbacks for this process (inherited by backends when preloaded);
    // called once from _PG_init.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0));
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        if pg_sys::process_shared_preload_libraries_in_progress {
            pg_shmem_init!(CONFIG_GENERATION);
        }
    }
}

/// Learn the OIDs of the watched tables if not known yet (after start or a drop of the caches).
pub fn watch_tables() {
    if WATCHED.with(|w| w.get()[0]) == 0 {
        remember_watched_tables();
    }
}

fn remember_watched_tables() {
    let (nsp, _) = catalog::quota_schema();
    let mut ids = [0u32; 8];
    for (i, name) in WATCHED_TABLES.iter().enumerate() {
        // SAFETY: syscache lookup by NUL-terminated name and namespace OID.
        ids[i] = unsafe { pg_sys::get_relname_relid(name.as_ptr(), nsp) }.to_u32();
    }
    WATCHED.with(|w| w.set(ids));
}

static PLAN_LOAD: Stmt = Stmt {
    sql: "SELECT period, max_amount FROM quota.limits WHERE plan = $1 AND metric = $2",
    args: &[T::TEXTOID, T::TEXTOID],
};

static EMPTY_LOAD: Stmt = Stmt {
    sql: "SELECT NOT EXISTS (SELECT FROM quota.subjects), NOT EXISTS (SELECT FROM quota.overrides)",
    args: &[],
};

macro_rules! subject_load {
    ($parent:literal) => {
        concat!(
            "
SELECT sj.subject IS NOT NULL, sj.plan, sj.time_zone, ",
            $parent,
            ", o.metric, o.period, o.max_amount
  FROM (SELECT) AS one
  LEFT JOIN quota.subjects AS sj ON sj.subject = $1
  LEFT JOIN quota.overrides AS o ON o.subject = $1"
        )
    };
}

static SUBJECT_LOAD: Stmt = Stmt {
    sql: subject_load!("sj.parent, sj.detached"),
    args: &[T::TEXTOID],
};

/// SUBJECT_LOAD on the tables of a version before 0.8.0 (no parents; see catalog::Shape).
static SUBJECT_LOAD_0_7: Stmt = Stmt {
    sql: subject_load!("NULL::text, false"),
    args: SUBJECT_LOAD.args,
};

fn plan_limits(client: &mut SpiClient<'_>, plan: &str, metric: &str) -> Rc<Vec<(String, i64)>> {
    let key = format!("{plan}\u{0}{metric}");
    if let Some(hit) = PLAN_LIMITS.with(|l| l.borrow().get(&key).cloned()) {
        return hit;
    }
    let gen = generation();
    let mut periods: Vec<(String, i64)> = spi::run(client, &PLAN_LOAD, &[plan.into(), metric.into()])
        .map(|row| {
            (
                spi::get::<String>(&row, 1).expect("period"),
                spi::get::<i64>(&row, 2).expect("max_amount"),
            )
        })
        .collect();
    periods.sort_by_key(|(p, _)| crate::quota::period::rank(p));
    let periods = Rc::new(periods);
    if generation() != gen {
        return periods;
    }
    note_fill();
    PLAN_LIMITS.with(|l| {
        let mut l = l.borrow_mut();
        if l.len() >= 10_000 {
            l.clear();
        }
        l.insert(key, periods.clone());
    });
    periods
}

/// A subject's row of quota.subjects and its overrides, from the backend cache.
pub fn subject(client: &mut SpiClient<'_>, subject: &str) -> Rc<Subject> {
    if let Some(hit) = SUBJECTS.with(|l| l.borrow().get(subject).cloned()) {
        return hit;
    }
    let gen = generation();
    let empty = TABLES_EMPTY.with(|t| t.get()).unwrap_or_else(|| {
        let row = spi::run(client, &EMPTY_LOAD, &[]).next().expect("one row");
        let e = (
            spi::get::<bool>(&row, 1).unwrap_or(false),
            spi::get::<bool>(&row, 2).unwrap_or(false),
        );
        if generation() == gen {
            note_fill();
            TABLES_EMPTY.with(|t| t.set(Some(e)));
        }
        e
    });
    let mut info = Subject {
        exists: false,
        plan: None,
        time_zone: "UTC".into(),
        parent: None,
        detached: false,
        overrides: Vec::new(),
    };
    if empty != (true, true) {
        let load = if catalog::shape().subjects_parent {
            &SUBJECT_LOAD
        } else {
            &SUBJECT_LOAD_0_7
        };
        for row in spi::run(client, load, &[subject.into()]) {
            if spi::get::<bool>(&row, 1) == Some(true) {
                info.exists = true;
                info.plan = spi::get::<String>(&row, 2);
                info.time_zone = spi::get::<String>(&row, 3).expect("time_zone");
                info.parent = spi::get::<String>(&row, 4);
                info.detached = spi::get::<bool>(&row, 5).unwrap_or(false);
            }
            if let Some(metric) = spi::get::<String>(&row, 6) {
                info.overrides.push((
                    metric,
                    spi::get::<String>(&row, 7).expect("period"),
                    spi::get::<i64>(&row, 8).expect("max_amount"),
                ));
            }
        }
    }
    let info = Rc::new(info);
    if generation() != gen {
        return info;
    }
    note_fill();
    SUBJECTS.with(|l| {
        let mut l = l.borrow_mut();
        if l.len() >= MAX_SUBJECTS {
            l.clear();
        }
        l.insert(subject.to_string(), info.clone());
    });
    info
}

static PLANS_LOAD: Stmt = Stmt {
    sql: "SELECT plan FROM quota.plans",
    args: &[],
};

/// Whether quota.plans has `plan`, from the backend cache.
fn plan_exists(client: &mut SpiClient<'_>, plan: &str) -> bool {
    if let Some(plans) = PLANS.with(|p| p.borrow().clone()) {
        return plans.contains(plan);
    }
    let gen = generation();
    let plans: std::collections::HashSet<String> = spi::run(client, &PLANS_LOAD, &[])
        .map(|row| spi::get::<String>(&row, 1).expect("plan"))
        .collect();
    let found = plans.contains(plan);
    if generation() == gen {
        note_fill();
        PLANS.with(|p| *p.borrow_mut() = Some(Rc::new(plans)));
    }
    found
}

/// The one plan rule, for quotas and rate limits alike: the subject's row in quota.subjects,
/// else the JWT claim app_metadata.plan of the caller acting as itself (`claim`) when it names
/// a plan of quota.plans, else quota_ext.default_plan.
fn effective_plan<'a>(
    client: &mut SpiClient<'_>,
    recorded: Option<&'a str>,
    claim: Option<&'a str>,
    default_plan: &'a str,
) -> &'a str {
    match (recorded, claim) {
        (Some(p), _) => p,
        (None, Some(c)) if plan_exists(client, c) => c,
        _ => default_plan,
    }
}

/// The subject's plan limits for `metric`, its overrides replacing them (or adding periods);
/// none when neither has one. `claim`: the plan the caller's JWT claims, when the caller acts
/// as this subject.
pub fn level_limits(
    client: &mut SpiClient<'_>,
    info: &Subject,
    metric: &str,
    default_plan: &str,
    claim: Option<&str>,
) -> SubjectLimits {
    let plan = effective_plan(client, info.plan.as_deref(), claim, default_plan);
    let mut periods: Vec<(String, i64)> = plan_limits(client, plan, metric).as_ref().clone();
    for (_, period, max) in info.overrides.iter().filter(|(m, _, _)| m == metric) {
        match periods.iter_mut().find(|(p, _)| p == period) {
            Some(slot) => slot.1 = *max,
            None => periods.push((period.clone(), *max)),
        }
    }
    periods.sort_by_key(|(p, _)| crate::quota::period::rank(p));
    SubjectLimits {
        plan: plan.to_string(),
        time_zone: info.time_zone.clone(),
        periods,
    }
}

/// Make the caches follow changes committed anywhere, and know which tables to watch; before
/// a look-up through them.
pub fn prepare() {
    follow_committed_changes();
    if WATCHED.with(|w| w.get()[0]) == 0 {
        remember_watched_tables();
    }
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

/// Trigger on the tables the caches are built from: queue a relcache invalidation of the
/// table, delivered to every backend at commit, and mark the transaction so that its commit
/// moves the shared generation on (see the module comment). (A module of its own:
/// #[pg_trigger] expands to code that names `Result`, which must be the standard one.)
mod trigger {
    use pgrx::prelude::*;
    use pgrx::{pg_sys, PgTrigger, PgTriggerError};

    #[pg_trigger]
    fn invalidate_limits_cache<'a>(
        trigger: &'a PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, PgTriggerError> {
        // SAFETY: queues an invalidation message for the OID of the trigger's own table.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(trigger.relation()?.oid()) };
        super::CHANGED_IN_XACT.with(|c| c.set(true));
        Ok(None)
    }
}

/// The plan of the caller acting as `subject_name` by the one plan rule (see effective_plan),
/// from the backend caches. Only the rate path asks, right after policy(), which has already
/// followed committed changes.
pub fn caller_plan(subject_name: &str, claim: Option<&str>, default_plan: &str) -> String {
    let recorded = SUBJECTS.with(|l| l.borrow().get(subject_name).map(|s| s.plan.clone()));
    // (Only the plan: a pooled policy's parent is found by the rate path through subject().)
    let known_claim = claim.and_then(|c| PLANS.with(|p| p.borrow().as_ref().map(|p| p.contains(c))));
    match (recorded, claim, known_claim) {
        (Some(Some(p)), _, _) => return p,
        (Some(None), None, _) | (Some(None), Some(_), Some(false)) => return default_plan.to_string(),
        (Some(None), Some(c), Some(true)) => return c.to_string(),
        _ => {}
    }
    if WATCHED.with(|w| w.get()[0]) == 0 {
        remember_watched_tables();
    }
    let _owner = crate::request::AsOwner::enter();
    Spi::connect_mut(|client| {
        let info = subject(client, subject_name);
        effective_plan(client, info.plan.as_deref(), claim, default_plan).to_string()
    })
}

/// The parent whose bucket a pooled rate policy spends for the caller acting as `subject_name`:
/// its parent in quota.subjects, else the parent its JWT names (`claim`) when that is a subject
/// of quota.subjects. From the backend caches; the rate path asks right after policy().
pub fn caller_parent(subject_name: &str, claim: Option<&str>) -> Option<String> {
    let lookup = |s: &str| -> Rc<Subject> {
        if let Some(hit) = SUBJECTS.with(|l| l.borrow().get(s).cloned()) {
            return hit;
        }
        prepare();
        let _owner = crate::request::AsOwner::enter();
        Spi::connect_mut(|client| subject(client, s))
    };
    let me = lookup(subject_name);
    if let Some(p) = &me.parent {
        return Some(p.clone());
    }
    if me.detached {
        return None;
    }
    let c = claim.filter(|c| *c != subject_name)?;
    lookup(c).exists.then(|| c.to_string())
}
