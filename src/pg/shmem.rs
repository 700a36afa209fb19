//! Shared memory: the set-up every structure shares, and the one pair of hooks that asks for
//! and builds them all, with the functions handed over by whoever wires the modules together.

use pgrx::pg_sys;
use pgrx::prelude::*;
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

/// Ask for `size` bytes of shared memory and a named tranche of `locks` LWLocks.
///
/// # Safety
/// Call from a shmem_request_hook (the postmaster's request phase).
pub unsafe fn request(size: usize, tranche: &CStr, locks: i32) {
    // SAFETY: per this function's contract.
    unsafe {
        pg_sys::RequestAddinShmemSpace(size);
        pg_sys::RequestNamedLWLockTranche(tranche.as_ptr(), locks);
    }
}

/// A secret drawn when shared memory is built, for the hashes that place keys in a table: from
/// the strong random source, or without one the clock and pid, which still differ from server
/// to server.
pub fn draw_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: fills the 8-byte buffer; the clock is read by the process.
    unsafe {
        if !pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) {
            seed = (pg_sys::GetCurrentTimestamp() as u64 ^ std::process::id() as u64).to_le_bytes();
        }
    }
    u64::from_le_bytes(seed)
}

/// A structure in shared memory: how to ask for its space and locks, and how to find or build
/// it (the second, unsafe, only from the startup hook after the first ran).
pub struct Structure {
    pub request: fn(),
    pub startup: unsafe fn(),
}

static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
static STRUCTURES: std::sync::OnceLock<&'static [Structure]> = std::sync::OnceLock::new();

/// From _PG_init while the library is being preloaded, after the postmaster settings that
/// size the structures are defined.
pub fn install_hooks(structures: &'static [Structure]) {
    let _ = STRUCTURES.set(structures);
    // SAFETY: installed once, in the postmaster, chaining to the previous hooks.
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

fn structures() -> &'static [Structure] {
    STRUCTURES.get().copied().unwrap_or_default()
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster in the shmem request phase.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
    }
    for s in structures() {
        (s.request)();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: the startup hook (at start-up, and again after a crash re-creates shared
    // memory), after the request hook above asked for the space.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        for s in structures() {
            (s.startup)();
        }
    }
}
