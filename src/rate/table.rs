//! The bucket table in shared memory: fixed slots in partitions, each partition under its own
//! LWLock, keys hashed with a seed chosen at start-up, and eviction of the least-owing bucket
//! when a partition is full.

use super::gcra::gcra;
use super::gcra::Gcra;
use crate::metrics::{self, Counter};
use crate::pg::error::QuotaError;
use crate::pg::guc;
use pgrx::pg_sys;
use std::ffi::CStr;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU64, Ordering};

pub const PARTITIONS: usize = 64;
const TRANCHE: &CStr = c"quota_ext_rate";
const SHMEM_NAME: &CStr = c"quota_ext_rate_buckets";
pub const MAX_KEY_BYTES: usize = 256;

#[repr(C)]
struct Slot {
    hi: u64,
    lo: u64,
    /// Key length in bytes; 0 marks a free slot (keys are never empty).
    len: u64,
    tat: AtomicI64,
}

#[repr(C)]
struct Header {
    slots_per_partition: u64,
    capacity_per_partition: u64,
    /// Secret of the key hash, drawn when shared memory is built: which partition and slot a
    /// key lands in cannot be worked out from outside, so no one can aim keys at another's
    /// partition.
    seed: u64,
    in_use: AtomicU64,
    used: [AtomicU64; PARTITIONS],
}

static HEADER: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());
static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
static LOCKS: AtomicPtr<pg_sys::LWLockPadded> = AtomicPtr::new(std::ptr::null_mut());

fn geometry() -> (usize, usize) {
    let keys = guc::rate_max_keys().max(PARTITIONS);
    let capacity = keys.div_ceil(PARTITIONS);
    // At most 75% full, so probe sequences stay short.
    (capacity, capacity * 4 / 3 + 1)
}

fn shmem_size() -> usize {
    let (_, slots) = geometry();
    std::mem::size_of::<Header>() + PARTITIONS * slots * std::mem::size_of::<Slot>()
}

/// The bucket table's share of shared memory (from shmem's request hook).
pub fn shmem_request() {
    // SAFETY: called in the postmaster's shmem request phase.
    unsafe { crate::pg::shmem::request(shmem_size(), TRANCHE, PARTITIONS as i32) };
}

/// Find or build the bucket table (from shmem's startup hook).
///
/// # Safety
/// Only from the shmem startup hook, after shmem_request asked for the space.
pub unsafe fn shmem_startup() {
    // SAFETY: per this function's contract.
    unsafe {
        let base = crate::pg::shmem::init_struct(SHMEM_NAME, shmem_size(), |base| {
            let (capacity, slots) = geometry();
            let h = base.cast::<Header>();
            (*h).slots_per_partition = slots as u64;
            (*h).capacity_per_partition = capacity as u64;
            (*h).seed = crate::pg::shmem::draw_seed();
        });
        HEADER.store(base.cast::<Header>(), Ordering::Release);
        SLOTS.store(
            base.add(std::mem::size_of::<Header>()).cast::<Slot>(),
            Ordering::Release,
        );
        LOCKS.store(pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr()), Ordering::Release);
    }
}

fn ready() -> bool {
    !HEADER.load(Ordering::Acquire).is_null()
}

pub fn keys_in_use() -> Option<i64> {
    let h = HEADER.load(Ordering::Acquire);
    // SAFETY: the header lives as long as shared memory.
    (!h.is_null()).then(|| unsafe { (*h).in_use.load(Ordering::Relaxed) as i64 })
}

pub fn key_capacity() -> i64 {
    (geometry().0 * PARTITIONS) as i64
}

/// One partition: its slots and its lock.
struct Partition {
    slots: *mut Slot,
    n: usize,
    capacity: usize,
    used: &'static AtomicU64,
    lock: *mut pg_sys::LWLock,
}

fn partition(hi: u64) -> Partition {
    let p = (hi % PARTITIONS as u64) as usize;
    // SAFETY: ready() was checked; index p is within the PARTITIONS partitions and locks.
    unsafe {
        let h = &*HEADER.load(Ordering::Acquire);
        let n = h.slots_per_partition as usize;
        Partition {
            slots: SLOTS.load(Ordering::Acquire).add(p * n),
            n,
            capacity: h.capacity_per_partition as usize,
            used: &h.used[p],
            lock: &raw mut (*LOCKS.load(Ordering::Acquire).add(p)).lock,
        }
    }
}

impl Partition {
    fn slot(&self, i: usize) -> &Slot {
        // SAFETY: i < n, within this partition.
        unsafe { &*self.slots.add(i) }
    }
    fn slot_mut(&self, i: usize) -> *mut Slot {
        // SAFETY: i < n, within this partition; callers hold the lock exclusively.
        unsafe { self.slots.add(i) }
    }
    /// The slot a hash starts probing at: `lo` scaled to 0..n by a multiply (Lemire's
    /// reduction), not a division.
    fn home(&self, lo: u64) -> usize {
        ((lo as u128 * self.n as u128) >> 64) as usize
    }
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.n {
            0
        } else {
            i + 1
        }
    }
    /// Position of the key's slot. Caller holds the lock (either mode).
    fn find(&self, hi: u64, lo: u64, len: u64) -> Option<usize> {
        let mut i = self.home(lo);
        for _ in 0..self.n {
            let s = self.slot(i);
            if s.len == 0 {
                return None;
            }
            if s.hi == hi && s.lo == lo && s.len == len {
                return Some(i);
            }
            i = self.next(i);
        }
        None
    }
    /// Put a new key in. Caller holds the lock exclusively and checked there is room.
    fn insert(&self, hi: u64, lo: u64, len: u64, tat: i64) {
        let mut i = self.home(lo);
        while self.slot(i).len != 0 {
            i = self.next(i);
        }
        // SAFETY: exclusive lock held; the slot is free.
        unsafe {
            let s = self.slot_mut(i);
            (*s).hi = hi;
            (*s).lo = lo;
            (*s).len = len;
            (*s).tat.store(tat, Ordering::Relaxed);
        }
        self.used.fetch_add(1, Ordering::Relaxed);
    }
    /// Free slot i, shifting later entries of its probe run back (no tombstones). Caller holds
    /// the lock exclusively.
    fn remove(&self, mut i: usize) {
        // SAFETY: exclusive lock held; all indexes are < n.
        unsafe {
            (*self.slot_mut(i)).len = 0;
            let mut j = i;
            loop {
                j = self.next(j);
                let sj = self.slot(j);
                if sj.len == 0 {
                    break;
                }
                let k = self.home(sj.lo);
                let stays = if i <= j { i < k && k <= j } else { i < k || k <= j };
                if !stays {
                    let (si, sj) = (self.slot_mut(i), self.slot_mut(j));
                    (*si).hi = (*sj).hi;
                    (*si).lo = (*sj).lo;
                    (*si).len = (*sj).len;
                    (*si)
                        .tat
                        .store((*sj).tat.load(Ordering::Relaxed), Ordering::Relaxed);
                    (*sj).len = 0;
                    i = j;
                }
            }
        }
        self.used.fetch_sub(1, Ordering::Relaxed);
    }
    fn lock(&self, mode: pg_sys::LWLockMode::Type) {
        // SAFETY: a lock of the named tranche, valid for the life of shared memory.
        unsafe { pg_sys::LWLockAcquire(self.lock, mode) };
    }
    fn unlock(&self) {
        // SAFETY: released by the process that acquired it.
        unsafe { pg_sys::LWLockRelease(self.lock) };
    }

    /// The bucket to evict from a full partition, as (slot, TAT), from the new key's home slot
    /// on. A bucket whose TAT has passed is full again and loses nothing by going; when none
    /// has, the one that owes least (the earliest TAT) goes, so a flood of new keys only ever
    /// pushes out the buckets closest to full, never lets a new key pass unlimited, and a busy
    /// key that owes a lot stays. Called with the partition locked exclusively.
    fn victim(&self, lo: u64, now: i64) -> Option<(usize, i64)> {
        let mut victim: Option<(usize, i64)> = None;
        let (mut i, mut seen) = (self.home(lo), 0);
        for _ in 0..self.n {
            let slot = self.slot(i);
            if slot.len != 0 {
                let tat = slot.tat.load(Ordering::Acquire);
                if victim.is_none_or(|(_, v)| tat < v) {
                    victim = Some((i, tat));
                    if tat <= now {
                        break;
                    }
                }
                seen += 1;
                if seen == EVICTION_SAMPLE {
                    break;
                }
            }
            i = self.next(i);
        }
        victim
    }
}

/// Whose bucket a key names: rate_check's keys are the caller's own text, rate_limit's are
/// `policy 0x1f key`; each kind hashes under its own seed, so no rate_check key (which may
/// hold 0x1f) names a policy bucket.
#[derive(Clone, Copy)]
pub enum Kind {
    Check,
    Policy,
}

/// The key's hash under the table's secret seed: (partition selector, slot selector, length).
fn key_hash(key: &[u8], kind: Kind) -> (u64, u64, u64) {
    // SAFETY: ready() was checked by the caller: the header exists; the seed never changes.
    let seed = unsafe { (*HEADER.load(Ordering::Acquire)).seed };
    let seed = match kind {
        Kind::Check => seed,
        Kind::Policy => seed ^ 0x9e37_79b9_7f4a_7c15,
    };
    let h = xxhash_rust::xxh3::xxh3_128_with_seed(key, seed);
    ((h >> 64) as u64, h as u64, key.len() as u64)
}

/// Buckets a full partition looks at to choose one to evict (from the new key's home slot
/// on): enough that a bucket in debt is almost never the one that owes least among them when
/// others owe less, few enough that the partition's lock is held briefly whatever
/// quota_ext.rate_max_keys is.
const EVICTION_SAMPLE: usize = 256;

/// Check `cost` against the bucket of `key` and take it when allowed.
pub fn check(key: &[u8], kind: Kind, t: i64, burst: i64, cost: i64, now: i64) -> Gcra {
    let (hi, lo, len) = key_hash(key, kind);
    let part = partition(hi);
    let rule = Rule { now, t, burst, cost };

    part.lock(pg_sys::LWLockMode::LW_SHARED);
    if let Some(i) = part.find(hi, lo, len) {
        let g = rule.take(part.slot(i));
        part.unlock();
        return g;
    }
    part.unlock();

    // A new key: a fresh (full) bucket. Nothing is stored unless the call is allowed and takes
    // tokens.
    let fresh = gcra(now, now, t, burst, cost);
    let Some(new_tat) = fresh.new_tat else {
        return fresh;
    };
    part.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
    if let Some(i) = part.find(hi, lo, len) {
        // Another session inserted it meanwhile.
        let g = rule.take(part.slot(i));
        part.unlock();
        return g;
    }
    let mut evicted = false;
    if part.used.load(Ordering::Relaxed) as usize >= part.capacity {
        let Some((i, tat)) = part.victim(lo, now) else {
            part.unlock();
            metrics::count(Counter::FullTableEvents);
            return when_full(fresh);
        };
        part.remove(i);
        evicted = true;
        if tat > now {
            metrics::count(Counter::FullTableEvents);
        }
    }
    part.insert(hi, lo, len, new_tat);
    part.unlock();
    // SAFETY: ready() holds: the header exists.
    unsafe {
        (*HEADER.load(Ordering::Acquire))
            .in_use
            .fetch_add(1 - evicted as u64, Ordering::Relaxed)
    };
    if evicted {
        metrics::count(Counter::Evictions);
    }
    fresh
}

/// One call's GCRA parameters, applied to a bucket.
struct Rule {
    now: i64,
    t: i64,
    burst: i64,
    cost: i64,
}

impl Rule {
    /// Apply the rule to a live bucket, storing its new TAT with a compare-and-swap (retried
    /// when another session changed it meanwhile).
    fn take(&self, slot: &Slot) -> Gcra {
        loop {
            let cur = slot.tat.load(Ordering::Acquire);
            let g = gcra(cur, self.now, self.t, self.burst, self.cost);
            let Some(new) = g.new_tat else { return g };
            if slot
                .tat
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return g;
            }
        }
    }
}

/// The answer for a new key when the table is full and no bucket may go
/// (quota_ext.rate_when_full).
fn when_full(fresh: Gcra) -> Gcra {
    match guc::RATE_WHEN_FULL.get() {
        guc::WhenFull::Allow => Gcra {
            new_tat: None,
            ..fresh
        },
        guc::WhenFull::Deny => Gcra {
            allowed: false,
            new_tat: None,
            remaining: 0,
            reset_after_ns: 0,
            retry_after_ns: None,
        },
    }
}

/// Give back `ns` of a bucket's TAT: what a take of `ns / t` tokens moved it by (a take
/// that others of the same all-or-nothing call undid, see rate::take_all). Under the shared
/// lock, like a take; a bucket evicted since has nothing to give back.
pub fn give_back(key: &[u8], kind: Kind, ns: i64) {
    let (hi, lo, len) = key_hash(key, kind);
    let part = partition(hi);
    part.lock(pg_sys::LWLockMode::LW_SHARED);
    if let Some(i) = part.find(hi, lo, len) {
        part.slot(i).tat.fetch_sub(ns, Ordering::AcqRel);
    }
    part.unlock();
}

/// Remove a key's bucket; true when there was one.
pub fn reset(key: &[u8]) -> bool {
    let (hi, lo, len) = key_hash(key, Kind::Check);
    let part = partition(hi);
    part.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
    let found = part.find(hi, lo, len);
    if let Some(i) = found {
        part.remove(i);
    }
    part.unlock();
    if found.is_some() {
        // SAFETY: ready() holds.
        unsafe {
            (*HEADER.load(Ordering::Acquire))
                .in_use
                .fetch_sub(1, Ordering::Relaxed)
        };
    }
    found.is_some()
}

pub fn require_ready() {
    if !ready() {
        QuotaError::NotPreloaded.raise();
    }
}
