//! quota_ext: exact quotas, rate limits and inventory batches inside PostgreSQL.
//! This file only wires the modules together. One folder per subsystem:
//! `quota/` (consume, refund, status, the admin functions; periods, decisions, the caches of
//! limits and subjects), `rate/` (the bucket table, GCRA, policies), `audit/` (the log and the
//! queue of refusals with its writer), `batch/` (inventory), `request/` (who calls: trust,
//! JWT claims, client address, the switch to the owner), `pg/` (what talks to PostgreSQL:
//! statements, catalog, settings, shared memory, errors), and `metrics.rs`.

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

mod audit;
mod batch;
mod breaker;
mod health;
mod latency;
mod metrics;
mod pg;
mod quota;
mod rate;
mod request;
mod upstream;

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    pg::guc::init();
    quota::cache::init();
    quota::hot::init();
    pg::catalog::init();
    request::init();
    metrics::init();
    latency::init();
    metrics::set_gauges(&GAUGES);
    metrics::set_extras(&EXTRAS);
    // SAFETY: reads a flag that is set while shared_preload_libraries is processed.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg::shmem::install_hooks(&SHARED_STRUCTURES);
    }
}

/// What lives in shared memory besides pgrx's own atomics.
static SHARED_STRUCTURES: [pg::shmem::Structure; 5] = [
    pg::shmem::Structure {
        request: rate::table::shmem_request,
        startup: rate::table::shmem_startup,
    },
    pg::shmem::Structure {
        request: audit::queue::shmem_request,
        startup: audit::queue::shmem_startup,
    },
    pg::shmem::Structure {
        request: breaker::table::shmem_request,
        startup: breaker::table::shmem_startup,
    },
    pg::shmem::Structure {
        request: upstream::table::shmem_request,
        startup: upstream::table::shmem_startup,
    },
    pg::shmem::Structure {
        request: quota::hot::shmem_request,
        startup: quota::hot::shmem_startup,
    },
];

/// Metrics kept outside metrics.rs: the latency histograms.
static EXTRAS: [metrics::Extra; 1] = [metrics::Extra {
    prometheus: latency::prometheus,
    reset: latency::reset,
}];

/// The gauges quota.metrics() shows after the counters.
static GAUGES: [metrics::Gauge; 9] = [
    metrics::Gauge {
        name: "keys_in_use",
        description: "rate-limit buckets in shared memory now",
        read: || rate::table::keys_in_use().unwrap_or(0),
    },
    metrics::Gauge {
        name: "audit_queue_depth",
        description: "audit rows waiting in the queue now (audit_queued = audit_written + audit_dropped + this, once writers are idle)",
        read: || audit::queue::depth().unwrap_or(0),
    },
    metrics::Gauge {
        name: "key_capacity",
        description: "rate-limit buckets that fit (quota_ext.rate_max_keys, rounded up per partition)",
        read: rate::table::key_capacity,
    },
    metrics::Gauge {
        name: "breakers_in_use",
        description: "circuit breakers in shared memory now (at most quota_ext.breaker_max)",
        read: || breaker::table::in_use().map_or(0, |(n, _)| n),
    },
    metrics::Gauge {
        name: "breakers_open",
        description: "circuit breakers open now (one past open_seconds goes half-open at its next call)",
        read: || breaker::table::in_use().map_or(0, |(_, open)| open),
    },
    metrics::Gauge {
        name: "hot_windows_in_use",
        description: "quota windows counted in shared memory now (at most quota_ext.hot_windows)",
        read: quota::hot::in_use,
    },
    metrics::Gauge {
        name: "hot_window_loads",
        description: "quota windows turned hot since the server started",
        read: || quota::hot::loads_and_full().0,
    },
    metrics::Gauge {
        name: "hot_windows_full",
        description: "windows that stayed cold since the server started because the hot table was full",
        read: || quota::hot::loads_and_full().1,
    },
    metrics::Gauge {
        name: "upstreams_in_use",
        description: "upstream API budgets in shared memory now (at most quota_ext.upstream_max)",
        read: || upstream::table::in_use().unwrap_or(0),
    },
];

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'quota_ext'"]
    }
}
