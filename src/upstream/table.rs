//! The upstream budgets in shared memory: a fixed number of slots (quota_ext.upstream_max), one
//! LWLock over all of them, held only for the arithmetic of one observation or one acquire
//! (nothing in between can raise), names hashed with a seed drawn at start-up.

use crate::pg::guc;
use pgrx::pg_sys;
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

const TRANCHE: &CStr = c"quota_ext_upstreams";
const SHMEM_NAME: &CStr = c"quota_ext_upstreams";

#[repr(C)]
struct Slot {
    hi: u64,
    lo: u64,
    /// Name length in bytes; 0 marks a free slot (names are never empty).
    len: u64,
    /// The upstream's limit for its window, as last observed.
    limit: i64,
    /// What is left to spend: the newest observation, less what was acquired since.
    remaining: i64,
    /// When the upstream's window resets (microseconds since 2000-01-01, PostgreSQL's
    /// timestamptz); i64::MIN: nothing observed.
    reset_at: i64,
}

#[repr(C)]
struct Header {
    slots: u64,
    capacity: u64,
    seed: u64,
    in_use: AtomicU64,
}

static HEADER: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());
static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLockPadded> = AtomicPtr::new(std::ptr::null_mut());

fn geometry() -> (usize, usize) {
    let capacity = guc::upstream_max().max(1);
    (capacity, capacity * 4 / 3 + 1)
}

fn shmem_size() -> usize {
    std::mem::size_of::<Header>() + geometry().1 * std::mem::size_of::<Slot>()
}

/// The budgets' share of shared memory (from shmem's request hook).
pub fn shmem_request() {
    // SAFETY: called in the postmaster's shmem request phase.
    unsafe { crate::pg::shmem::request(shmem_size(), TRANCHE, 1) };
}

/// Find or build the budgets (from shmem's startup hook).
///
/// # Safety
/// Only from the shmem startup hook, after shmem_request asked for the space.
pub unsafe fn shmem_startup() {
    // SAFETY: per this function's contract.
    unsafe {
        let base = crate::pg::shmem::init_struct(SHMEM_NAME, shmem_size(), |base| {
            let (capacity, slots) = geometry();
            let h = base.cast::<Header>();
            (*h).slots = slots as u64;
            (*h).capacity = capacity as u64;
            (*h).seed = crate::pg::shmem::draw_seed();
        });
        HEADER.store(base.cast::<Header>(), Ordering::Release);
        SLOTS.store(
            base.add(std::mem::size_of::<Header>()).cast::<Slot>(),
            Ordering::Release,
        );
        LOCK.store(pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr()), Ordering::Release);
    }
}

pub fn ready() -> bool {
    !HEADER.load(Ordering::Acquire).is_null()
}

pub fn in_use() -> Option<i64> {
    let h = HEADER.load(Ordering::Acquire);
    // SAFETY: the header lives as long as shared memory.
    (!h.is_null()).then(|| unsafe { (*h).in_use.load(Ordering::Relaxed) as i64 })
}

/// What a call does to a budget.
#[derive(Clone, Copy)]
pub enum Op {
    /// The upstream said: `limit` a window, `remaining` left, the window resets at `reset_at`.
    Observe {
        limit: i64,
        remaining: i64,
        reset_at: i64,
    },
    /// Spend `cost`, keeping `reserve` unspent.
    Acquire { cost: i64, reserve: i64 },
}

/// A budget as a call left it.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub allowed: bool,
    /// None: nothing observed yet (or the window reset with nothing observed since).
    pub remaining: Option<i64>,
    pub reset_at: Option<i64>,
}

pub struct Full;

/// Apply `op` to the budget of `name` at `now` (microseconds, timestamptz). Between the lock and
/// its release there is only arithmetic on the slot.
pub fn apply(name: &[u8], op: Op, now: i64) -> Result<Seen, Full> {
    // SAFETY: ready() was checked by the caller; the table lives as long as shared memory.
    let (h, slots, n) = unsafe {
        let h = &*HEADER.load(Ordering::Acquire);
        (h, SLOTS.load(Ordering::Acquire), h.slots as usize)
    };
    let hash = xxhash_rust::xxh3::xxh3_128_with_seed(name, h.seed);
    let (hi, lo, len) = ((hash >> 64) as u64, hash as u64, name.len() as u64);
    // SAFETY: the tranche's one lock, valid for the life of shared memory; acquired and
    // released here with nothing between that can raise.
    let lock = unsafe { &raw mut (*LOCK.load(Ordering::Acquire)).lock };
    unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
    let mut i = ((lo as u128 * n as u128) >> 64) as usize;
    let mut found = None;
    for _ in 0..n {
        // SAFETY: i < n; the lock is held.
        let s = unsafe { &*slots.add(i) };
        if s.len == 0 || (s.hi == hi && s.lo == lo && s.len == len) {
            found = Some(i);
            break;
        }
        i = if i + 1 == n { 0 } else { i + 1 };
    }
    let Some(i) = found else {
        // SAFETY: acquired above.
        unsafe { pg_sys::LWLockRelease(lock) };
        return Err(Full);
    };
    // SAFETY: the lock is held exclusively.
    let s = unsafe { &mut *slots.add(i) };
    if s.len == 0 {
        if matches!(op, Op::Acquire { .. }) || h.in_use.load(Ordering::Relaxed) >= h.capacity {
            // Nothing known of an upstream never observed: an acquire spends from no budget
            // (and takes no slot); an observation needs one.
            let full = matches!(op, Op::Observe { .. });
            // SAFETY: acquired above.
            unsafe { pg_sys::LWLockRelease(lock) };
            return if full {
                Err(Full)
            } else {
                Ok(Seen {
                    allowed: true,
                    remaining: None,
                    reset_at: None,
                })
            };
        }
        *s = Slot {
            hi,
            lo,
            len,
            limit: 0,
            remaining: 0,
            reset_at: i64::MIN,
        };
        h.in_use.fetch_add(1, Ordering::Relaxed);
    }
    let seen = step(s, op, now);
    // SAFETY: acquired above.
    unsafe { pg_sys::LWLockRelease(lock) };
    Ok(seen)
}

/// `reset_at` of a budget whose window has passed: the upstream refilled it, and when it resets
/// next is not known until the next observation.
const REFILLED: i64 = i64::MAX;

/// One observation or acquire on a budget. An observation of a later window replaces the
/// budget; one of the same window wins unless it says more is left than the budget holds (it
/// may be older than acquires made since: the least of the two is kept); one of an earlier
/// window is stale and changes nothing. Once the window's reset_at has passed, the upstream
/// has refilled: its full limit is spendable until the next observation says otherwise.
fn step(s: &mut Slot, op: Op, now: i64) -> Seen {
    if s.reset_at != i64::MIN && s.reset_at != REFILLED && now >= s.reset_at {
        s.remaining = s.limit;
        s.reset_at = REFILLED;
    }
    let known = s.reset_at != i64::MIN;
    let mut allowed = true;
    match op {
        Op::Observe {
            limit,
            remaining,
            reset_at,
        } => {
            if !known || s.reset_at == REFILLED || reset_at > s.reset_at {
                (s.limit, s.remaining, s.reset_at) = (limit, remaining, reset_at);
            } else if reset_at == s.reset_at {
                s.limit = limit;
                s.remaining = s.remaining.min(remaining);
            }
            allowed = s.remaining > 0;
        }
        Op::Acquire { cost, reserve } => {
            if !known {
                return Seen {
                    allowed: true,
                    remaining: None,
                    reset_at: None,
                };
            }
            if s.remaining.saturating_sub(cost) >= reserve {
                s.remaining -= cost;
            } else {
                allowed = false;
            }
        }
    }
    Seen {
        allowed,
        remaining: Some(s.remaining),
        reset_at: (s.reset_at != REFILLED && s.reset_at != i64::MIN).then_some(s.reset_at),
    }
}
