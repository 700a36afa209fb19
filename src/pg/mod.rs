//! What talks to PostgreSQL itself: prepared statements, catalog look-ups, the settings,
//! shared memory, and the errors the extension raises.

pub mod catalog;
pub mod error;
pub mod guc;
pub mod shmem;
pub mod spi;

/// The current transaction's start (now()), in microseconds since 2000-01-01 UTC: the time
/// every window, reset and audit row of a call is computed from.
pub fn now_micros() -> i64 {
    // SAFETY: reads a backend-local timestamp.
    unsafe { pgrx::pg_sys::GetCurrentTransactionStartTimestamp() }
}
