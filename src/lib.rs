//! quota_ext: exact quotas, rate limits and inventory batches inside PostgreSQL.
//! This file only wires the modules together; each concern lives in its own file.

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

mod audit;
mod audit_queue;
mod batch;
mod cache;
mod catalog;
mod decision;
mod error;
mod guc;
mod identity;
mod metrics;
mod period;
mod policy;
mod quota;
mod rate;
mod shmem;
mod spi;

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    cache::init();
    catalog::init();
    identity::init();
    metrics::init();
    metrics::set_gauges(&GAUGES);
    // SAFETY: reads a flag that is set while shared_preload_libraries is processed.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::install_hooks(&SHARED_STRUCTURES);
    }
}

/// What lives in shared memory besides pgrx's own atomics.
static SHARED_STRUCTURES: [shmem::Structure; 2] = [
    shmem::Structure {
        request: rate::shmem_request,
        startup: rate::shmem_startup,
    },
    shmem::Structure {
        request: audit_queue::shmem_request,
        startup: audit_queue::shmem_startup,
    },
];

/// The gauges quota.metrics() shows after the counters.
static GAUGES: [metrics::Gauge; 3] = [
    metrics::Gauge {
        name: "keys_in_use",
        description: "rate-limit buckets in shared memory now",
        read: || rate::keys_in_use().unwrap_or(0),
    },
    metrics::Gauge {
        name: "audit_queue_depth",
        description: "audit rows waiting in the queue now (audit_queued = audit_written + audit_dropped + this, once writers are idle)",
        read: || audit_queue::depth().unwrap_or(0),
    },
    metrics::Gauge {
        name: "key_capacity",
        description: "rate-limit buckets that fit (quota_ext.rate_max_keys, rounded up per partition)",
        read: rate::key_capacity,
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
