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

/// Nanoseconds on the system's monotonic clock, the one clock every backend shares that
/// nobody steps: a wall clock set back (NTP, an administrator, a VM resumed) would hold every
/// touched rate bucket empty until it caught up, and one set forward would refill them all.
/// Only differences of it leave quota_ext (the answers carry seconds from now), and what is
/// timed by it lives in shared memory, which starts anew after a restart anyway, so its origin
/// (the boot) does not matter.
pub fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec; CLOCK_MONOTONIC exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as i64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as i64)
}
