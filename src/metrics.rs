//! Cluster-wide counters in shared memory (atomics: no lock, nothing that can fail). Like a
//! sequence they are not transactional: a decision counted stays counted if its transaction
//! rolls back, which is what lets refusals that raise an error be counted at all. They start at
//! zero after a restart. Without `shared_preload_libraries = 'quota_ext'` nothing is counted and
//! the metrics functions say how to enable them.

use crate::pg::error::{OrRaise, QuotaError};
use crate::request;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Clone, Copy)]
#[repr(usize)]
pub enum Counter {
    Consumes,
    Denials,
    Refunds,
    Replays,
    BatchConsumes,
    VersionConflicts,
    InsufficientQuantity,
    RateChecks,
    RateDenials,
    ShadowDenials,
    Evictions,
    FullTableEvents,
    AuditQueued,
    AuditWritten,
    AuditDropped,
    AuditRejected,
    BreakerAllowed,
    BreakerDenied,
    BreakerOpened,
    BreakerFull,
    UpstreamAcquired,
    UpstreamDenied,
    UpstreamFull,
    CacheLookups,
    CacheInvalidations,
}

const COUNTERS: [(&str, &str); 25] = [
    ("consumes", "quota.consume/require calls that granted"),
    ("denials", "quota.consume/require calls that denied"),
    ("refunds", "quota.refund calls"),
    ("idempotent_replays", "calls answered from an idempotency key"),
    (
        "batch_consumes",
        "consume_batch_quantity and consume_item calls that took quantity",
    ),
    (
        "version_conflicts",
        "consume_batch_quantity calls refused for a stale expected version",
    ),
    (
        "insufficient_quantity",
        "batch consumptions refused for insufficient quantity",
    ),
    ("rate_checks", "rate_check and rate_limit calls"),
    ("rate_denials", "rate checks that denied"),
    (
        "shadow_denials",
        "rate_limit calls a shadow policy allowed but would have denied",
    ),
    ("evictions", "buckets evicted to make room for new keys"),
    (
        "full_table_events",
        "new keys that found their partition full with no refilled bucket (the one owing least was evicted)",
    ),
    (
        "audit_queued",
        "audit rows of refusals that raise, queued for the audit writer",
    ),
    ("audit_written", "queued audit rows the audit writer wrote"),
    (
        "audit_dropped",
        "queued audit rows lost: their database was gone, or the writer failed to write them",
    ),
    (
        "audit_rejected",
        "audit rows of refusals that found the queue full (never queued)",
    ),
    (
        "breaker_allowed",
        "breaker_allow calls that let the caller through",
    ),
    (
        "breaker_denied",
        "breaker_allow calls refused by an open or busy half-open breaker",
    ),
    (
        "breaker_opened",
        "times a breaker opened (closed or half-open to open)",
    ),
    (
        "breaker_full",
        "calls for a new breaker that found the table full (quota_ext.breaker_max)",
    ),
    (
        "upstream_acquired",
        "upstream_acquire calls that spent from a budget",
    ),
    (
        "upstream_denied",
        "upstream_acquire calls refused: the budget was spent down to its reserve",
    ),
    (
        "upstream_full",
        "observations of a new upstream API that found the table full (quota_ext.upstream_max)",
    ),
    (
        "cache_lookups",
        "calls that used the backend caches of plans, limits, subjects and policies",
    ),
    (
        "cache_invalidations",
        "times a backend dropped those caches (a committed change to their tables, or a lost invalidation)",
    ),
];

/// Each backend counts in one of SHARDS rows (by process id), each on cache lines of its own,
/// so backends on different cores do not fight over one line on every call; readers sum them.
const SHARDS: usize = 16;

#[repr(C, align(128))]
pub struct Shard([AtomicU64; COUNTERS.len()]);

pub struct Counters([Shard; SHARDS]);

impl Default for Counters {
    fn default() -> Self {
        Counters(std::array::from_fn(|_| {
            Shard(std::array::from_fn(|_| AtomicU64::new(0)))
        }))
    }
}

impl Counters {
    fn total(&self, i: usize) -> u64 {
        self.0.iter().map(|s| s.0[i].load(Relaxed)).sum()
    }
}

fn my_shard() -> usize {
    // SAFETY: reads this process's pid, set at backend start.
    (unsafe { pgrx::pg_sys::MyProcPid } as usize) % SHARDS
}

// SAFETY: plain atomics with no pointers, valid in every process that maps the segment.
unsafe impl PGRXSharedMemory for Counters {}

// SAFETY: the name is unique to this extension.
static SHARED: PgAtomic<Counters> = unsafe { PgAtomic::new(c"quota_ext_counters") };

thread_local! {
    static PRELOADED: Cell<bool> = const { Cell::new(false) };
}

/// From _PG_init: set up the counters when the library is being preloaded.
pub fn init() {
    // SAFETY: reads a postmaster flag that is set while shared_preload_libraries is processed.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(SHARED);
        PRELOADED.with(|p| p.set(true));
    }
}

pub fn preloaded() -> bool {
    PRELOADED.with(|p| p.get())
}

pub fn count(c: Counter) {
    count_n(c, 1);
}

pub fn count_n(c: Counter, n: u64) {
    if preloaded() && n > 0 {
        SHARED.get().0[my_shard()].0[c as usize].fetch_add(n, Relaxed);
    }
}

pub fn count_batch_consume() {
    count(Counter::BatchConsumes);
}

/// Count a refusal of a batch consumption by its kind.
pub fn count_refusal(e: &QuotaError) {
    match e {
        QuotaError::VersionConflict { .. } => count(Counter::VersionConflicts),
        QuotaError::Insufficient { .. } => count(Counter::InsufficientQuantity),
        _ => {}
    }
}

fn require_preloaded() {
    if !preloaded() {
        QuotaError::NotPreloaded.raise();
    }
}

fn snapshot() -> Vec<(String, i64, String)> {
    require_preloaded();
    let mut rows: Vec<(String, i64, String)> = COUNTERS
        .iter()
        .enumerate()
        .map(|(i, (name, desc))| (name.to_string(), SHARED.get().total(i) as i64, desc.to_string()))
        .collect();
    for g in GAUGES.get().copied().unwrap_or_default() {
        rows.push((g.name.to_string(), (g.read)(), g.description.to_string()));
    }
    rows
}

/// The value of a counter or gauge by name (None without the preload or for an unknown name).
pub fn value(name: &str) -> Option<i64> {
    if !preloaded() {
        return None;
    }
    if let Some(i) = COUNTERS.iter().position(|(n, _)| *n == name) {
        return Some(SHARED.get().total(i) as i64);
    }
    GAUGES
        .get()
        .and_then(|gs| gs.iter().find(|g| g.name == name))
        .map(|g| (g.read)())
}

/// Gauges are not counters: Prometheus wants them typed as such.
fn is_gauge(name: &str) -> bool {
    GAUGES.get().is_some_and(|gs| gs.iter().any(|g| g.name == name))
}

/// A value other modules report as it is now (not a counter): read when the metrics are.
pub struct Gauge {
    pub name: &'static str,
    pub description: &'static str,
    pub read: fn() -> i64,
}

/// The gauges, handed over once from _PG_init by whoever wires the modules together, so this
/// module knows nothing of the modules that have them.
static GAUGES: std::sync::OnceLock<&'static [Gauge]> = std::sync::OnceLock::new();

pub fn set_gauges(gauges: &'static [Gauge]) {
    let _ = GAUGES.set(gauges);
}

/// Other metrics kept elsewhere (the latency histograms): their Prometheus text, appended to
/// metrics_prometheus(), and how reset_metrics() resets them.
pub struct Extra {
    pub prometheus: fn() -> String,
    pub reset: fn(),
}

static EXTRAS: std::sync::OnceLock<&'static [Extra]> = std::sync::OnceLock::new();

/// Handed over once from _PG_init, like the gauges.
pub fn set_extras(extras: &'static [Extra]) {
    let _ = EXTRAS.set(extras);
}

/// The counters, cluster-wide since the last restart or reset_metrics().
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn metrics() -> TableIterator<'static, (name!(name, String), name!(value, i64), name!(description, String))> {
    TableIterator::new(snapshot())
}

/// The counters in Prometheus' text exposition format, as `quota_ext_<name>_total`.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn metrics_prometheus() -> String {
    let mut out = String::new();
    let extras: String = EXTRAS
        .get()
        .copied()
        .unwrap_or_default()
        .iter()
        .map(|e| (e.prometheus)())
        .collect();
    for (name, value, desc) in snapshot() {
        let (metric, kind) = if is_gauge(&name) {
            (format!("quota_ext_{name}"), "gauge")
        } else {
            (format!("quota_ext_{name}_total"), "counter")
        };
        out.push_str(&format!(
            "# HELP {metric} {desc}\n# TYPE {metric} {kind}\n{metric} {value}\n"
        ));
    }
    out.push_str(&extras);
    out
}

/// Set every counter back to zero (trusted callers only).
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn reset_metrics() {
    request::require_trusted("quota.reset_metrics").or_raise();
    require_preloaded();
    for shard in &SHARED.get().0 {
        for c in &shard.0 {
            c.store(0, Relaxed);
        }
    }
    for e in EXTRAS.get().copied().unwrap_or_default() {
        (e.reset)();
    }
}
