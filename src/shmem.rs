//! Shared-memory set-up common to the rate-limit table and the audit queue.

use pgrx::pg_sys;
use std::ffi::CStr;

/// AddinShmemInitLock: MainLWLockArray[21] (PostgreSQL's lwlocknames.txt), a macro bindgen
/// does not export.
const ADDIN_SHMEM_INIT_LOCK: usize = 21;

/// Find, or create zeroed and hand to `init`, the structure of `size` bytes named `name`.
/// AddinShmemInitLock serializes it with other extensions' set-up.
///
/// # Safety
/// Call from a shmem_startup_hook (in the postmaster at start-up, and again after a crash
/// re-creates shared memory), with the size that was requested in the shmem_request_hook.
pub unsafe fn init_struct(name: &CStr, size: usize, init: impl FnOnce(*mut u8)) -> *mut u8 {
    // SAFETY: per this function's contract.
    unsafe {
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let base = pg_sys::ShmemInitStruct(name.as_ptr(), size, &mut found).cast::<u8>();
        if !found {
            std::ptr::write_bytes(base, 0, size);
            init(base);
        }
        pg_sys::LWLockRelease(lock);
        base
    }
}
