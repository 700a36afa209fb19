//! Hot windows: a quota window that many callers charge at once is counted in shared memory, so
//! that they do not queue on its usage row.
//!
//! A cold window is charged by the usage row's `INSERT ... ON CONFLICT DO UPDATE ... WHERE`: the
//! row lock makes it exact, and also makes every caller of the window wait for the previous
//! one's commit to be flushed. A hot window has a slot here whose `used` counts every grant of
//! the window, committed or in flight. A grant takes its amount from the slot with an atomic
//! compare-and-swap against the limit (exact: the slot never passes it), and writes it to its
//! backend's own row of `quota.usage_stripes` (the durable record, which no other caller
//! locks); the transaction's abort, or a rolled-back savepoint's, gives the amount back to the
//! slot (xact and subxact callbacks). The usage of a window is then the usage row plus its
//! stripes, which `status`, `near_limit`, peeks and refunds read.
//!
//! Turning hot (load): a backend that finds a window busy (quota_ext.hot_after consumes of its
//! subject and metric within a second, counted by a sketch here) claims a slot (LOADING), locks
//! the usage row in a subtransaction, which waits for the cold grants in flight, reads the
//! usage row and the stripes in a new snapshot (every grant so far, committed), stores that in
//! the slot and makes it ACTIVE, then rolls the subtransaction back, which releases the lock.
//! A cold grant checks, after its statement took the row lock, whether the window turned hot
//! meanwhile; if so the loader finished before it got the lock, did not count it, and the grant
//! takes its amount from the slot too (or is undone when the slot has no room). Loading happens
//! only at READ COMMITTED (at REPEATABLE READ the lock could raise a serialization failure).
//!
//! A slot is freed only when nothing can miss it: its window has ended, no transaction holds an
//! amount of it, and every snapshot of the server sees the last transaction that charged it
//! (the oldest xmin is past it), so a cold statement with an old snapshot still counts those
//! stripes. A cold statement checks the usage row plus the stripes, so a window whose slot is
//! gone (a restart, a crash, a promoted standby: shared memory starts empty) is charged exactly
//! from what is durable until it is loaded again.
//!
//! A prepared transaction (two-phase commit) would hold an amount across a restart that the
//! rebuilt slot could not see: PREPARE TRANSACTION is refused for a transaction that charged a
//! hot window.
//!
//! Everything done under the table's LWLock is arithmetic on slots: nothing there can raise.

use crate::pg::guc;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};

const TRANCHE: &CStr = c"quota_ext_hot_windows";
const SHMEM_NAME: &CStr = c"quota_ext_hot_windows";
/// Counters of the detector (a count-min sketch of one row: a collision can only make a cold
/// subject hot early, which is harmless).
const SKETCH: usize = 4096;

const FREE: u32 = 0;
const LOADING: u32 = 1;
const ACTIVE: u32 = 2;
/// A freed slot that a search must step over (open addressing).
const TOMB: u32 = 3;

#[repr(C)]
struct Slot {
    hi: u64,
    lo: u64,
    state: AtomicU32,
    /// Transactions (and pending decreases) holding an amount of this slot.
    inflight: AtomicU32,
    /// End of the window (PostgreSQL timestamp, microseconds); i64::MAX for 'total'.
    reset_at: i64,
    /// Every grant of the window, committed or in flight.
    used: AtomicI64,
    /// Full transaction id of the last transaction that charged the window.
    last_xid: AtomicU64,
}

#[repr(C)]
struct Header {
    slots: u64,
    capacity: u64,
    seed: u64,
    in_use: AtomicU64,
    loads: AtomicU64,
    full: AtomicU64,
    /// Slots freed since start (see may_have_stripes).
    freed: AtomicU64,
    sketch: [AtomicU64; SKETCH],
}

static HEADER: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());
static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLockPadded> = AtomicPtr::new(std::ptr::null_mut());

fn geometry() -> (usize, usize) {
    let capacity = guc::hot_windows();
    (capacity, if capacity == 0 { 0 } else { capacity * 4 / 3 + 1 })
}

fn shmem_size() -> usize {
    std::mem::size_of::<Header>() + geometry().1 * std::mem::size_of::<Slot>()
}

/// The hot table's share of shared memory (from shmem's request hook).
pub fn shmem_request() {
    // SAFETY: called in the postmaster's shmem request phase.
    unsafe { crate::pg::shmem::request(shmem_size(), TRANCHE, 1) };
}

/// Find or build the hot table (from shmem's startup hook).
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
        SLOTS.store(
            base.add(std::mem::size_of::<Header>()).cast::<Slot>(),
            Ordering::Release,
        );
        LOCK.store(pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr()), Ordering::Release);
        HEADER.store(base.cast::<Header>(), Ordering::Release);
    }
}

fn header() -> Option<&'static Header> {
    let h = HEADER.load(Ordering::Acquire);
    // SAFETY: the header lives as long as shared memory.
    (!h.is_null()).then(|| unsafe { &*h }).filter(|h| h.slots > 0)
}

/// Hot windows in the table now (loading or counted).
pub fn in_use() -> i64 {
    header().map_or(0, |h| h.in_use.load(Ordering::Relaxed) as i64)
}

/// Windows turned hot since start, and turns refused for a full table.
pub fn loads_and_full() -> (i64, i64) {
    header().map_or((0, 0), |h| {
        (
            h.loads.load(Ordering::Relaxed) as i64,
            h.full.load(Ordering::Relaxed) as i64,
        )
    })
}

/// The identity of one window in the table: a keyed 128-bit hash of its database, the files of
/// its usage tables (catalog::Shape::usage_files: a TRUNCATE or a re-created extension starts
/// anew), subject, metric, period and start (as the rate and breaker tables name their keys).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Key {
    hi: u64,
    lo: u64,
}

/// The key of a window, None when there is no hot table (not preloaded, hot_windows = 0).
pub fn key(subject: &str, metric: &str, period: &str, window_start: i64) -> Option<Key> {
    let h = header()?;
    let mut bytes = Vec::with_capacity(subject.len() + metric.len() + period.len() + 16);
    // SAFETY: a backend global.
    bytes.extend_from_slice(&unsafe { pg_sys::MyDatabaseId }.to_u32().to_le_bytes());
    bytes.extend_from_slice(&crate::pg::catalog::usage_files().to_le_bytes());
    for part in [subject, metric, period] {
        bytes.extend_from_slice(part.as_bytes());
        bytes.push(0);
    }
    bytes.extend_from_slice(&window_start.to_le_bytes());
    let x = xxhash_rust::xxh3::xxh3_128_with_seed(&bytes, h.seed);
    // lo is never 0 for a key, so that a zeroed slot names nothing.
    Some(Key {
        hi: (x >> 64) as u64,
        lo: (x as u64) | 1,
    })
}

/// Count one consume of `subject`'s `metric` in the detector; true once they pass
/// quota_ext.hot_after within the current second.
pub fn busy(subject: &str, metric: &str) -> bool {
    let Some(h) = header() else { return false };
    let after = guc::hot_after();
    if after == 0 {
        return false;
    }
    let mut bytes = Vec::with_capacity(subject.len() + metric.len() + 5);
    // SAFETY: a backend global.
    bytes.extend_from_slice(&unsafe { pg_sys::MyDatabaseId }.to_u32().to_le_bytes());
    bytes.extend_from_slice(subject.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(metric.as_bytes());
    let x = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, h.seed);
    let cell = &h.sketch[(x as usize) % SKETCH];
    let second = (crate::pg::monotonic_ns() / 1_000_000_000) as u64 & 0xffff_ffff;
    let mut count = 0;
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        count = if v >> 32 == second {
            (v & 0xffff_ffff) + 1
        } else {
            1
        };
        Some(second << 32 | count.min(0xffff_ffff))
    });
    count >= after as u64
}

struct Table {
    h: &'static Header,
    slots: *mut Slot,
    n: usize,
    lock: *mut pg_sys::LWLock,
}

fn table() -> Option<Table> {
    let h = header()?;
    let lock = LOCK.load(Ordering::Acquire);
    Some(Table {
        h,
        slots: SLOTS.load(Ordering::Acquire),
        n: h.slots as usize,
        // SAFETY: the tranche's one lock, valid for the life of shared memory.
        lock: unsafe { &raw mut (*lock).lock },
    })
}

impl Table {
    fn slot(&self, i: usize) -> &Slot {
        // SAFETY: i < n; the slots live as long as shared memory.
        unsafe { &*self.slots.add(i) }
    }
    fn slot_mut(&self, i: usize) -> *mut Slot {
        // SAFETY: i < n.
        unsafe { self.slots.add(i) }
    }
    fn acquire(&self, mode: pg_sys::LWLockMode::Type) {
        // SAFETY: a valid LWLock; released by release() in the same function, with nothing
        // between that can raise.
        unsafe { pg_sys::LWLockAcquire(self.lock, mode) };
    }
    fn release(&self) {
        // SAFETY: acquired by acquire().
        unsafe { pg_sys::LWLockRelease(self.lock) };
    }
    /// The slot of the key (any state but FREE and TOMB), and the first reusable slot on its
    /// probe sequence. Under the lock.
    fn find(&self, k: Key) -> (Option<usize>, Option<usize>) {
        let mut i = ((k.lo as u128 * self.n as u128) >> 64) as usize;
        let mut reusable = None;
        for _ in 0..self.n {
            let s = self.slot(i);
            match s.state.load(Ordering::Acquire) {
                FREE => return (None, reusable.or(Some(i))),
                TOMB => {
                    reusable.get_or_insert(i);
                }
                _ if s.hi == k.hi && s.lo == k.lo => return (Some(i), None),
                _ => {}
            }
            i = if i + 1 == self.n { 0 } else { i + 1 };
        }
        (None, reusable)
    }
}

/// What the table says about taking an amount of a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// The window is not hot (no slot, or one still loading).
    Cold,
    /// Taken: what the window's usage is now, and the reservation, to give back with `undo`
    /// if the call goes on to deny.
    Granted { used: i64, ticket: usize },
    /// No room: the window's usage now.
    Denied { used: i64 },
}

/// What this backend holds of hot windows, in the current transaction.
#[derive(Clone, Copy, Debug)]
struct Held {
    slot: usize,
    amount: i64,
    /// A reservation (taken now, given back on abort) or a decrease (applied on commit).
    decrease: bool,
    subxact: pg_sys::SubTransactionId,
    /// Unique within the backend, to find a reservation again (undo).
    ticket: usize,
}

thread_local! {
    /// The slot this backend claimed and is loading: abandoned by the transaction's abort when
    /// the load did not finish (an error or a FATAL exit inside it).
    static LOADING_SLOT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    static HELD: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
    static NEXT_TICKET: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
}

fn full_xid() -> u64 {
    // SAFETY: assigns this transaction an id if it has none (a write follows anyway); the
    // caller checked that the transaction may write.
    unsafe { pg_sys::GetTopFullTransactionId().value }
}

/// Whether this transaction may take the hot path: it may write and it is not a parallel
/// worker's.
pub fn may_charge() -> bool {
    // SAFETY: backend globals and a shared-memory flag read.
    unsafe { !pg_sys::RecoveryInProgress() && !pg_sys::XactReadOnly && !pg_sys::IsInParallelMode() }
}

/// Take `amount` of the window `k` if it is hot and the limit has room.
pub fn take(k: Key, amount: i64, limit: i64) -> Take {
    let Some(t) = table() else { return Take::Cold };
    if t.h.in_use.load(Ordering::Acquire) == 0 {
        // Nothing is hot (a slot is counted in use from its claim, before it loads).
        return Take::Cold;
    }
    let xid = full_xid();
    // SAFETY: a backend-local id of the current subtransaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    t.acquire(pg_sys::LWLockMode::LW_SHARED);
    let (found, _) = t.find(k);
    let out = match found {
        Some(i) if t.slot(i).state.load(Ordering::Acquire) == ACTIVE => {
            let s = t.slot(i);
            match s.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u <= limit - amount).then(|| u + amount)
            }) {
                Ok(before) => {
                    s.inflight.fetch_add(1, Ordering::AcqRel);
                    s.last_xid.fetch_max(xid, Ordering::AcqRel);
                    Ok((i, before + amount))
                }
                Err(now) => Err(Take::Denied { used: now }),
            }
        }
        _ => Err(Take::Cold),
    };
    t.release();
    match out {
        Ok((slot, used)) => Take::Granted {
            used,
            ticket: hold(slot, amount, false, subxact),
        },
        Err(t) => t,
    }
}

/// Give back a reservation `take` made in this call, which is about to deny (nothing durable
/// was written for it).
pub fn undo(ticket: usize) {
    let held = HELD.with(|h| {
        let mut h = h.borrow_mut();
        let i = h.iter().position(|e| e.ticket == ticket && !e.decrease)?;
        Some(h.remove(i))
    });
    if let (Some(e), Some(t)) = (held, table()) {
        give_back(&t, e);
    }
}

/// Lower the hot window `k` by `amount` when this transaction commits (a refund, a reset: the
/// durable rows went down by that much). Nothing when the window is not hot.
pub fn decrease_at_commit(k: Key, amount: i64) {
    if amount <= 0 {
        return;
    }
    let Some(t) = table() else { return };
    // SAFETY: a backend-local id of the current subtransaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    t.acquire(pg_sys::LWLockMode::LW_SHARED);
    let (found, _) = t.find(k);
    let slot = found.filter(|&i| t.slot(i).state.load(Ordering::Acquire) == ACTIVE);
    if let Some(i) = slot {
        t.slot(i).inflight.fetch_add(1, Ordering::AcqRel);
    }
    t.release();
    if let Some(slot) = slot {
        hold(slot, amount, true, subxact);
    }
}

/// Remember what this transaction holds of a slot (its `inflight` already counts it); returns
/// the ticket that names it.
fn hold(slot: usize, amount: i64, decrease: bool, subxact: pg_sys::SubTransactionId) -> usize {
    let ticket = NEXT_TICKET.with(|n| n.replace(n.get() + 1));
    HELD.with(|h| {
        h.borrow_mut().push(Held {
            slot,
            amount,
            decrease,
            subxact,
            ticket,
        })
    });
    ticket
}

/// Slots freed since start.
pub fn freed() -> u64 {
    header().map_or(0, |h| h.freed.load(Ordering::Acquire))
}

/// Whether the window may have stripes written in this server's life: it has a slot (loading
/// or hot), or some slot was freed since start (whose window may be this one). A window for
/// which this says no has no stripes but those of an earlier life of the server, which the
/// caller checks for (charge::old_stripes): then its cold grant need not read the stripes, and
/// if it turns hot before the grant takes its row lock, the grant counts in the slot (see the
/// module comment). A window cannot be freed while a statement that read it cold runs: that
/// statement's snapshot holds the horizon the freeing waits for.
pub fn may_have_stripes(k: Key) -> bool {
    let Some(t) = table() else { return false };
    if t.h.freed.load(Ordering::Acquire) > 0 {
        return true;
    }
    state(k).is_some()
}

/// The state of the window's slot (loading or hot), None without one.
fn state(k: Key) -> Option<u32> {
    let t = table()?;
    if t.h.in_use.load(Ordering::Acquire) == 0 {
        return None;
    }
    t.acquire(pg_sys::LWLockMode::LW_SHARED);
    let (found, _) = t.find(k);
    let state = found.map(|i| t.slot(i).state.load(Ordering::Acquire));
    t.release();
    state
}

/// Whether the window is hot now.
pub fn is_hot(k: Key) -> bool {
    state(k) == Some(ACTIVE)
}

/// The end of a held amount: given back (abort) or kept (commit); a decrease applied (commit)
/// or dropped (abort). The slot cannot be freed while `inflight` counts this.
fn settle(t: &Table, e: Held, committed: bool) {
    let s = t.slot(e.slot);
    match (e.decrease, committed) {
        (false, false) | (true, true) => {
            s.used.fetch_sub(e.amount, Ordering::AcqRel);
        }
        _ => {}
    }
    s.inflight.fetch_sub(1, Ordering::AcqRel);
}

fn give_back(t: &Table, e: Held) {
    settle(t, e, false);
}

/// The usage row of a window the caller is about to load, locked in a subtransaction: see
/// `load`.
pub enum Claim {
    /// This backend claimed the slot (LOADING): call `activate` or `abandon`.
    Claimed(usize),
    /// Another backend has it (loading or hot), or the table is full.
    No,
}

/// The oldest transaction id every snapshot of the server may still not see as finished, as a
/// full id (relative to the next one).
fn horizon() -> u64 {
    // SAFETY: reads the process array (under its own lock) and the next transaction id.
    unsafe {
        let oldest = pg_sys::GetOldestNonRemovableTransactionId(std::ptr::null_mut()).into_inner();
        let next = pg_sys::ReadNextFullTransactionId().value;
        let epoch = next >> 32;
        let low = next as u32;
        let e = if oldest <= low {
            epoch
        } else {
            epoch.saturating_sub(1)
        };
        e << 32 | oldest as u64
    }
}

/// Claim a slot for the window `k`, which ends at `reset_at` (None: never), to load it.
pub fn claim(k: Key, reset_at: Option<i64>) -> Claim {
    let Some(t) = table() else { return Claim::No };
    let full = t.h.in_use.load(Ordering::Relaxed) >= t.h.capacity;
    // SAFETY: reads the clock.
    let (now, oldest) = if full {
        (unsafe { pg_sys::GetCurrentTimestamp() }, horizon())
    } else {
        (0, 0)
    };
    t.acquire(pg_sys::LWLockMode::LW_EXCLUSIVE);
    if full {
        // Free every slot nothing can miss any more (see the module comment).
        for i in 0..t.n {
            let s = t.slot(i);
            if s.state.load(Ordering::Acquire) == ACTIVE
                && s.reset_at <= now
                && s.inflight.load(Ordering::Acquire) == 0
                && s.last_xid.load(Ordering::Acquire) < oldest
            {
                s.state.store(TOMB, Ordering::Release);
                t.h.in_use.fetch_sub(1, Ordering::Relaxed);
                t.h.freed.fetch_add(1, Ordering::Release);
            }
        }
    }
    let (found, free) = t.find(k);
    let out = match (found, free) {
        (None, Some(i)) if t.h.in_use.load(Ordering::Relaxed) < t.h.capacity => {
            // SAFETY: under the exclusive lock; the slot is free.
            unsafe {
                let s = t.slot_mut(i);
                (*s).hi = k.hi;
                (*s).lo = k.lo;
                (*s).reset_at = reset_at.unwrap_or(i64::MAX);
                (*s).used.store(0, Ordering::Relaxed);
                (*s).inflight.store(0, Ordering::Relaxed);
                (*s).last_xid.store(0, Ordering::Relaxed);
                (*s).state.store(LOADING, Ordering::Release);
            }
            t.h.in_use.fetch_add(1, Ordering::Relaxed);
            LOADING_SLOT.with(|l| l.set(Some(i)));
            Claim::Claimed(i)
        }
        (None, _) => {
            t.h.full.fetch_add(1, Ordering::Relaxed);
            Claim::No
        }
        (Some(_), _) => Claim::No,
    };
    t.release();
    out
}

/// The claimed slot counts `used` (the window's durable usage, read under its row lock) and is
/// hot from now on.
pub fn activate(slot: usize, used: i64) {
    LOADING_SLOT.with(|l| l.set(None));
    let Some(t) = table() else { return };
    t.acquire(pg_sys::LWLockMode::LW_EXCLUSIVE);
    let s = t.slot(slot);
    s.used.store(used, Ordering::Release);
    s.state.store(ACTIVE, Ordering::Release);
    t.h.loads.fetch_add(1, Ordering::Relaxed);
    t.release();
}

/// The claimed slot is not loaded after all (the load failed): free it.
pub fn abandon(slot: usize) {
    LOADING_SLOT.with(|l| l.set(None));
    let Some(t) = table() else { return };
    t.acquire(pg_sys::LWLockMode::LW_EXCLUSIVE);
    let s = t.slot(slot);
    if s.state.load(Ordering::Acquire) == LOADING {
        s.state.store(TOMB, Ordering::Release);
        t.h.in_use.fetch_sub(1, Ordering::Relaxed);
    }
    t.release();
}

/// This backend's row in quota.usage_stripes: its PGPROC's number, which no other live
/// process has.
pub fn stripe() -> i32 {
    // SAFETY: MyProc points into ProcGlobal->allProcs for the life of the process.
    unsafe {
        let all = (*pg_sys::ProcGlobal).allProcs;
        (pg_sys::MyProc.offset_from(all)) as i32
    }
}

pub fn init() {
    // SAFETY: registers callbacks of this process (inherited by backends when preloaded);
    // called once from _PG_init.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

fn settle_all(committed: bool, which: impl Fn(&Held) -> bool) {
    let taken: Vec<Held> = HELD.with(|h| {
        let mut h = h.borrow_mut();
        let (out, keep): (Vec<Held>, Vec<Held>) = h.drain(..).partition(|e| which(e));
        *h = keep;
        out
    });
    if let Some(t) = table() {
        for e in taken {
            settle(&t, e, committed);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_PREPARE => {
            if HELD.with(|h| !h.borrow().is_empty()) {
                pgrx::pg_sys::panic::ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that charged a hot quota window",
                    "quota_ext",
                )
                .set_detail("A prepared transaction would hold its grant across a restart, and the hot windows live in shared memory, which a restart empties.")
                .set_hint("Commit instead of preparing, or set quota_ext.hot_after = 0 for the sessions that prepare transactions.")
                .report(PgLogLevel::ERROR);
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => settle_all(true, |_| true),
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            if let Some(slot) = LOADING_SLOT.with(std::cell::Cell::get) {
                abandon(slot);
            }
            settle_all(false, |_| true)
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_ABORT_SUB => settle_all(false, |e| e.subxact == my_subid),
        SUBXACT_EVENT_COMMIT_SUB => HELD.with(|h| {
            for e in h.borrow_mut().iter_mut().filter(|e| e.subxact == my_subid) {
                e.subxact = parent_subid;
            }
        }),
        _ => {}
    }
}
