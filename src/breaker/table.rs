//! The breaker table in shared memory: a fixed number of slots (quota_ext.breaker_max), one
//! LWLock over all of them (each call reads and changes a breaker's state in a few arithmetic
//! steps, which can raise nothing), names hashed with a seed drawn at start-up.

use crate::pg::guc;
use pgrx::pg_sys;
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

const TRANCHE: &CStr = c"quota_ext_breakers";
const SHMEM_NAME: &CStr = c"quota_ext_breakers";

/// The states of a breaker, as the seed's CircuitBreaker has them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
    fn from_code(c: u64) -> State {
        match c {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }
    fn code(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

#[repr(C)]
struct Slot {
    hi: u64,
    lo: u64,
    /// Name length in bytes; 0 marks a free slot (names are never empty).
    len: u64,
    state: u64,
    failures: u64,
    /// Probes let through since the breaker went half-open.
    probes: u64,
    /// When it opened, nanoseconds (pg::monotonic_ns's clock).
    opened_at: i64,
}

#[repr(C)]
struct Header {
    slots: u64,
    capacity: u64,
    seed: u64,
    in_use: AtomicU64,
    open: AtomicU64,
}

static HEADER: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());
static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLockPadded> = AtomicPtr::new(std::ptr::null_mut());

fn geometry() -> (usize, usize) {
    let capacity = guc::breaker_max().max(1);
    (capacity, capacity * 4 / 3 + 1)
}

fn shmem_size() -> usize {
    std::mem::size_of::<Header>() + geometry().1 * std::mem::size_of::<Slot>()
}

/// The breaker table's share of shared memory (from shmem's request hook).
pub fn shmem_request() {
    // SAFETY: called in the postmaster's shmem request phase.
    unsafe { crate::pg::shmem::request(shmem_size(), TRANCHE, 1) };
}

/// Find or build the breaker table (from shmem's startup hook).
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

/// Breakers in the table now, and how many of them are open.
pub fn in_use() -> Option<(i64, i64)> {
    let h = HEADER.load(Ordering::Acquire);
    // SAFETY: the header lives as long as shared memory.
    (!h.is_null()).then(|| unsafe {
        (
            (*h).in_use.load(Ordering::Relaxed) as i64,
            (*h).open.load(Ordering::Relaxed) as i64,
        )
    })
}

/// What a breaker's rules are (quota.breakers, or the defaults).
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub failure_threshold: u64,
    pub open_ns: i64,
    pub half_open_probes: u64,
}

/// A breaker as a call left it.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub allowed: bool,
    pub state: State,
    pub failures: u64,
    /// Nanoseconds until an open breaker lets a probe through (0 otherwise).
    pub retry_after_ns: i64,
    /// This call opened it.
    pub opened: bool,
}

/// What a call does to a breaker.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// May the caller call the service now (half-open: take a probe if one is left).
    Allow,
    /// The outcome of a call to the service.
    Record { success: bool },
    /// Forget the breaker (closed, no failures).
    Reset,
}

/// Applying an op found the table full: no slot for a new breaker.
pub struct Full;

struct Table {
    h: &'static Header,
    slots: *mut Slot,
    n: usize,
}

fn table() -> Table {
    // SAFETY: ready() was checked by the caller; the table lives as long as shared memory.
    unsafe {
        let h = &*HEADER.load(Ordering::Acquire);
        Table {
            h,
            slots: SLOTS.load(Ordering::Acquire),
            n: h.slots as usize,
        }
    }
}

impl Table {
    fn slot(&self, i: usize) -> *mut Slot {
        // SAFETY: i < n; the caller holds the lock.
        unsafe { self.slots.add(i) }
    }
    fn home(&self, lo: u64) -> usize {
        ((lo as u128 * self.n as u128) >> 64) as usize
    }
    /// The slot of the name, or where it would go (None: not there and no room).
    fn find(&self, hi: u64, lo: u64, len: u64) -> (Option<usize>, Option<usize>) {
        let mut i = self.home(lo);
        for _ in 0..self.n {
            // SAFETY: the caller holds the lock.
            let s = unsafe { &*self.slot(i) };
            if s.len == 0 {
                return (None, Some(i));
            }
            if s.hi == hi && s.lo == lo && s.len == len {
                return (Some(i), None);
            }
            i = if i + 1 == self.n { 0 } else { i + 1 };
        }
        (None, None)
    }
}

/// Apply `op` to the breaker named `name` at `now` (ns) under its rules. Everything between
/// the lock and its release is arithmetic on the slot: nothing can raise while it is held.
pub fn apply(name: &[u8], rules: Rules, op: Op, now: i64) -> Result<Seen, Full> {
    let t = table();
    let h = xxhash_rust::xxh3::xxh3_128_with_seed(name, t.h.seed);
    let (hi, lo, len) = ((h >> 64) as u64, h as u64, name.len() as u64);
    let lock = LOCK.load(Ordering::Acquire);
    // SAFETY: the tranche's one lock, valid for the life of shared memory.
    let lock = unsafe { &raw mut (*lock).lock };
    // SAFETY: acquired and released in this function, with nothing between that can raise.
    unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
    let (found, free) = t.find(hi, lo, len);
    let i = match (found, free) {
        (Some(i), _) => i,
        (None, _) if op != Op::Allow && !matches!(op, Op::Record { success: false }) => {
            // Nothing to record for a breaker never seen (a success, a reset): it is closed.
            // SAFETY: acquired above.
            unsafe { pg_sys::LWLockRelease(lock) };
            return Ok(Seen {
                allowed: true,
                state: State::Closed,
                failures: 0,
                retry_after_ns: 0,
                opened: false,
            });
        }
        (None, Some(i)) if (t.h.in_use.load(Ordering::Relaxed) as usize) < t.h.capacity as usize => {
            // SAFETY: the lock is held exclusively; the slot is free.
            unsafe {
                *t.slot(i) = Slot {
                    hi,
                    lo,
                    len,
                    state: 0,
                    failures: 0,
                    probes: 0,
                    opened_at: 0,
                };
            }
            t.h.in_use.fetch_add(1, Ordering::Relaxed);
            i
        }
        _ => {
            // SAFETY: acquired above.
            unsafe { pg_sys::LWLockRelease(lock) };
            return Err(Full);
        }
    };
    // SAFETY: the lock is held exclusively.
    let s = unsafe { &mut *t.slot(i) };
    let before = State::from_code(s.state);
    let mut seen = step(s, rules, op, now);
    let after = State::from_code(s.state);
    seen.opened = before != State::Open && after == State::Open;
    if (before == State::Open) != (after == State::Open) {
        if after == State::Open {
            t.h.open.fetch_add(1, Ordering::Relaxed);
        } else {
            t.h.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
    // SAFETY: acquired above.
    unsafe { pg_sys::LWLockRelease(lock) };
    Ok(seen)
}

/// The state machine of the seed's CircuitBreaker, on one slot: closed counts failures and
/// opens at the threshold; open refuses until open_seconds have passed, then is half-open;
/// half-open lets `half_open_probes` callers through, a success closes it, a failure opens it
/// again.
fn step(s: &mut Slot, rules: Rules, op: Op, now: i64) -> Seen {
    let mut state = State::from_code(s.state);
    if state == State::Open && now.saturating_sub(s.opened_at) >= rules.open_ns {
        state = State::HalfOpen;
        s.probes = 0;
    }
    let mut allowed = true;
    match (op, state) {
        (Op::Reset, _) => {
            state = State::Closed;
            s.failures = 0;
            s.probes = 0;
        }
        (Op::Allow, State::Closed) => {}
        (Op::Allow, State::Open) => allowed = false,
        (Op::Allow, State::HalfOpen) => {
            if s.probes < rules.half_open_probes {
                s.probes += 1;
            } else {
                allowed = false;
            }
        }
        (Op::Record { success: true }, State::Open) => {}
        (Op::Record { success: true }, _) => {
            state = State::Closed;
            s.failures = 0;
            s.probes = 0;
        }
        (Op::Record { success: false }, State::Closed) => {
            s.failures += 1;
            if s.failures >= rules.failure_threshold {
                state = State::Open;
                s.opened_at = now;
            }
        }
        (Op::Record { success: false }, State::HalfOpen) => {
            s.failures += 1;
            state = State::Open;
            s.opened_at = now;
            s.probes = 0;
        }
        (Op::Record { success: false }, State::Open) => s.failures += 1,
    }
    s.state = state.code();
    let retry_after_ns = if state == State::Open {
        (s.opened_at.saturating_add(rules.open_ns) - now).max(0)
    } else {
        0
    };
    Seen {
        allowed,
        state,
        failures: s.failures,
        retry_after_ns,
        opened: false,
    }
}
