//! How long each decision takes inside the database, per function: histograms in shared
//! memory (atomics, sharded by backend like the counters), as Prometheus histograms in
//! metrics_prometheus() and as mean and percentiles in quota.latency(). A call is timed from
//! its entry to its return or its error (a Drop guard). quota_ext.latency = off stops timing.

use crate::pg::guc;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// The histograms exist: set in the postmaster while the library is preloaded (backends
/// inherit it).
static LOADED: AtomicBool = AtomicBool::new(false);

/// The functions timed, in the order of their histograms.
#[derive(Clone, Copy)]
#[repr(usize)]
pub enum Func {
    Consume,
    Require,
    Refund,
    RateCheck,
    RateLimit,
    PreRequest,
    ConsumeBatchQuantity,
    ConsumeItem,
    BreakerAllow,
}

pub const FUNCTIONS: [&str; 9] = [
    "consume",
    "require",
    "refund",
    "rate_check",
    "rate_limit",
    "pre_request",
    "consume_batch_quantity",
    "consume_item",
    "breaker_allow",
];

/// Upper bounds of the buckets, in nanoseconds (the last bucket, +Inf, has none).
pub const BOUNDS_NS: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
    1_000_000_000,
];
const BUCKETS: usize = BOUNDS_NS.len() + 1;
const SHARDS: usize = 8;

#[repr(C, align(128))]
struct Hist {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

pub struct Histograms([[Hist; FUNCTIONS.len()]; SHARDS]);

impl Default for Histograms {
    fn default() -> Self {
        Histograms(std::array::from_fn(|_| {
            std::array::from_fn(|_| Hist {
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_ns: AtomicU64::new(0),
            })
        }))
    }
}

// SAFETY: plain atomics with no pointers, valid in every process that maps the segment.
unsafe impl PGRXSharedMemory for Histograms {}

// SAFETY: the name is unique to this extension.
static HIST: PgAtomic<Histograms> = unsafe { PgAtomic::new(c"quota_ext_latency") };

pub fn init() {
    // SAFETY: called once from _PG_init while shared_preload_libraries is processed.
    unsafe {
        if pgrx::pg_sys::process_shared_preload_libraries_in_progress {
            pgrx::pg_shmem_init!(HIST);
            LOADED.store(true, Relaxed);
        }
    }
}

/// Times one call from its creation to its drop (return or error).
pub struct Timer(Option<(Func, i64)>);

impl Timer {
    pub fn start(f: Func) -> Timer {
        if !LOADED.load(Relaxed) || !guc::LATENCY.get() {
            return Timer(None);
        }
        Timer(Some((f, crate::pg::monotonic_ns())))
    }

    /// When the call started (pg::monotonic_ns's clock), for a call that needs the time anyway
    /// (rate_check): one clock reading fewer.
    pub fn now(&self) -> i64 {
        self.0.map_or_else(crate::pg::monotonic_ns, |(_, t0)| t0)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((f, t0)) = self.0 {
            let ns = (crate::pg::monotonic_ns() - t0).max(0) as u64;
            let b = BOUNDS_NS.iter().position(|b| ns <= *b).unwrap_or(BOUNDS_NS.len());
            // SAFETY: reads this process's pid, set at backend start.
            let shard = (unsafe { pgrx::pg_sys::MyProcPid } as usize) % SHARDS;
            let h = &HIST.get().0[shard][f as usize];
            h.buckets[b].fetch_add(1, Relaxed);
            h.sum_ns.fetch_add(ns, Relaxed);
        }
    }
}

/// (per-bucket counts, sum in ns) of a function, over all shards.
fn totals(f: usize) -> ([u64; BUCKETS], u64) {
    let mut buckets = [0u64; BUCKETS];
    let mut sum = 0u64;
    for shard in &HIST.get().0 {
        for (i, b) in shard[f].buckets.iter().enumerate() {
            buckets[i] += b.load(Relaxed);
        }
        sum = sum.wrapping_add(shard[f].sum_ns.load(Relaxed));
    }
    (buckets, sum)
}

pub fn reset() {
    if !LOADED.load(Relaxed) {
        return;
    }
    for shard in &HIST.get().0 {
        for h in shard {
            for b in &h.buckets {
                b.store(0, Relaxed);
            }
            h.sum_ns.store(0, Relaxed);
        }
    }
}

/// The histograms in Prometheus' text format: quota_ext_decision_seconds{function=...}.
pub fn prometheus() -> String {
    if !LOADED.load(Relaxed) {
        return String::new();
    }
    let mut out = String::from(
        "# HELP quota_ext_decision_seconds Time each decision took inside the database, per function\n# TYPE quota_ext_decision_seconds histogram\n",
    );
    for (f, name) in FUNCTIONS.iter().enumerate() {
        let (buckets, sum) = totals(f);
        let mut cumulative = 0u64;
        for (i, n) in buckets.iter().enumerate() {
            cumulative += n;
            let le = BOUNDS_NS
                .get(i)
                .map(|b| format!("{}", *b as f64 / 1e9))
                .unwrap_or_else(|| "+Inf".into());
            out.push_str(&format!(
                "quota_ext_decision_seconds_bucket{{function=\"{name}\",le=\"{le}\"}} {cumulative}\n"
            ));
        }
        out.push_str(&format!(
            "quota_ext_decision_seconds_sum{{function=\"{name}\"}} {}\nquota_ext_decision_seconds_count{{function=\"{name}\"}} {cumulative}\n",
            sum as f64 / 1e9
        ));
    }
    out
}

/// The q-quantile of a histogram in ms, interpolated linearly within its bucket (the +Inf
/// bucket answers its lower bound).
fn quantile(buckets: &[u64; BUCKETS], count: u64, q: f64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let rank = q * count as f64;
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n > 0 && (seen + n) as f64 >= rank {
            let lo = if i == 0 { 0 } else { BOUNDS_NS[i - 1] } as f64;
            let Some(hi) = BOUNDS_NS.get(i).map(|b| *b as f64) else {
                return Some(lo / 1e6);
            };
            let within = ((rank - seen as f64) / *n as f64).clamp(0.0, 1.0);
            return Some((lo + (hi - lo) * within) / 1e6);
        }
        seen += n;
    }
    None
}

/// Count, mean, p50, p95 and p99 (ms) of each timed function, since the start or
/// reset_metrics(); the percentiles are interpolated within the histogram's buckets.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn latency() -> Result<
    TableIterator<
        'static,
        (
            name!(function, String),
            name!(calls, i64),
            name!(mean_ms, Option<f64>),
            name!(p50_ms, Option<f64>),
            name!(p95_ms, Option<f64>),
            name!(p99_ms, Option<f64>),
        ),
    >,
    pgrx::pg_sys::panic::ErrorReport,
> {
    crate::request::require_trusted("quota.latency")?;
    if !LOADED.load(Relaxed) {
        return Err(crate::pg::error::QuotaError::NotPreloaded.into());
    }
    let rows: Vec<_> = FUNCTIONS
        .iter()
        .enumerate()
        .map(|(f, name)| {
            let (buckets, sum) = totals(f);
            let count: u64 = buckets.iter().sum();
            let mean = (count > 0).then(|| sum as f64 / count as f64 / 1e6);
            (
                name.to_string(),
                count as i64,
                mean,
                quantile(&buckets, count, 0.50),
                quantile(&buckets, count, 0.95),
                quantile(&buckets, count, 0.99),
            )
        })
        .collect();
    Ok(TableIterator::new(rows))
}
