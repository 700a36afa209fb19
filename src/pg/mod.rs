//! What talks to PostgreSQL itself: prepared statements, catalog look-ups, the settings,
//! shared memory, and the errors the extension raises.

pub mod catalog;
pub mod error;
pub mod guc;
pub mod shmem;
pub mod spi;
