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
    rate::init();
    audit_queue::init();
    // SAFETY: reads a flag that is set while shared_preload_libraries is processed.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::install_hooks();
    }
}

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
