//! Rate limits: GCRA token buckets in shared memory.
//!
//! A bucket is one word of state, its theoretical arrival time (TAT, nanoseconds on the
//! monotonic clock): the moment it would be full again. The table is an open-addressing hash table split into PARTITIONS
//! partitions, each with its own LWLock. A check takes its partition's lock in shared mode and
//! updates the TAT with a compare-and-swap, so checks on different keys never wait for each
//! other and checks on one key never take an exclusive lock; only inserting, evicting and
//! resetting a bucket take the partition exclusively. Nothing that can raise an ERROR runs
//! while a lock is held: only hashing-free arithmetic and memory reads and writes.
//!
//! Keys are identified by a 128-bit xxh3 hash plus their length. Sized by
//! quota_ext.rate_max_keys (postmaster); state is not transactional (like a sequence) and
//! starts empty after a restart or a crash.

pub mod policy;

use crate::metrics::{self, Counter};
use crate::pg::error::{OrRaise, QuotaError};
use crate::pg::guc;
use crate::request;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata as sql_meta;
use pgrx::prelude::*;
use std::borrow::Cow;
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
    unsafe {
        pg_sys::RequestAddinShmemSpace(shmem_size());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), PARTITIONS as i32);
    }
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
            let mut seed = [0u8; 8];
            if !pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) {
                // No strong random source: the clock still differs from server to server.
                seed = (pg_sys::GetCurrentTimestamp() as u64 ^ std::process::id() as u64).to_le_bytes();
            }
            (*h).seed = u64::from_le_bytes(seed);
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
}

/// The GCRA answer for a bucket whose TAT is `tat` (nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gcra {
    pub allowed: bool,
    /// TAT to store when allowed (None: nothing changes).
    pub new_tat: Option<i64>,
    pub remaining: i64,
    pub reset_after_ns: i64,
    /// None when the cost can never pass (it exceeds the burst).
    pub retry_after_ns: Option<i64>,
}

/// Generic cell rate algorithm, as redis-cell's CL.THROTTLE: a bucket of `burst` tokens that
/// refills one token every `t` nanoseconds. `cost` 0 peeks. A denied call changes nothing.
pub fn gcra(tat: i64, now: i64, t: i64, burst: i64, cost: i64) -> Gcra {
    let (t128, limit) = (t as i128, t as i128 * burst as i128);
    let base = tat.max(now) as i128;
    let now128 = now as i128;
    // Whole tokens left at `tat`; the division in 64 bits when it fits (it nearly always does).
    let remaining_at = |tat: i128| {
        let room = limit - (tat - now128);
        match i64::try_from(room) {
            Ok(r) => (r / t).max(0),
            Err(_) => (room / t128).max(0) as i64,
        }
    };
    if cost > burst {
        return Gcra {
            allowed: false,
            new_tat: None,
            remaining: remaining_at(base),
            reset_after_ns: (base - now128) as i64,
            retry_after_ns: None,
        };
    }
    let new_tat = base + t128 * cost as i128;
    if new_tat - now128 > limit {
        return Gcra {
            allowed: false,
            new_tat: None,
            remaining: remaining_at(base),
            reset_after_ns: (base - now128) as i64,
            retry_after_ns: Some((new_tat - limit - now128) as i64),
        };
    }
    Gcra {
        allowed: true,
        new_tat: (cost > 0).then_some(new_tat.min(i64::MAX as i128) as i64),
        remaining: remaining_at(new_tat),
        reset_after_ns: (new_tat - now128) as i64,
        retry_after_ns: Some(0),
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

    let take = |slot: &Slot| loop {
        let cur = slot.tat.load(Ordering::Acquire);
        let g = gcra(cur, now, t, burst, cost);
        match g.new_tat {
            None => return g,
            Some(new) => {
                if slot
                    .tat
                    .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return g;
                }
            }
        }
    };

    part.lock(pg_sys::LWLockMode::LW_SHARED);
    if let Some(i) = part.find(hi, lo, len) {
        let g = take(part.slot(i));
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
        let g = take(part.slot(i));
        part.unlock();
        return g;
    }
    let mut evicted = false;
    if part.used.load(Ordering::Relaxed) as usize >= part.capacity {
        // Full: a bucket whose TAT has passed is full again and loses nothing by going; when
        // none has, the one that owes least (the earliest TAT) goes, so a flood of new keys
        // only ever pushes out the buckets closest to full, never lets a new key pass
        // unlimited, and a busy key that owes a lot stays.
        let mut victim: Option<(usize, i64)> = None;
        let (mut i, mut seen) = (part.home(lo), 0);
        for _ in 0..part.n {
            let slot = part.slot(i);
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
            i = part.next(i);
        }
        match victim {
            Some((i, tat)) => {
                part.remove(i);
                evicted = true;
                if tat > now {
                    metrics::count(Counter::FullTableEvents);
                }
            }
            None => {
                part.unlock();
                metrics::count(Counter::FullTableEvents);
                return match guc::RATE_WHEN_FULL.get() {
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
                };
            }
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

/// Nanoseconds on the system's monotonic clock, the one clock every backend shares that
/// nobody steps: a wall clock set back (NTP, an administrator, a VM resumed) would hold every
/// touched bucket empty until it caught up, and one set forward would refill them all. Only
/// differences of it leave quota_ext (the answers carry seconds from now), and the buckets
/// start empty after a restart anyway, so its origin (the boot) does not matter.
pub fn now_ns() -> i64 {
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

/// A `quota.rate_decision` formed in one step and handed to PostgreSQL as it is. pgrx's
/// composite return (`PgHeapTuple`) collects the values into two vectors, forms the tuple and
/// then copies it once more into the result datum: work of the size of the whole rate check.
pub struct RateDecision(pg_sys::Datum);

// SAFETY: the datum is a composite of the function's declared result type, formed in the
// call's memory context (see decision_row).
unsafe impl pgrx::callconv::BoxRet for RateDecision {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut pgrx::callconv::FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        // SAFETY: returned from the function the datum was formed for.
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

// SAFETY: the SQL type named is the one every RateDecision is formed as.
unsafe impl sql_meta::SqlTranslatable for RateDecision {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(RateDecision);
    const TYPE_ORIGIN: sql_meta::TypeOrigin = sql_meta::TypeOrigin::External;
    const ARGUMENT_SQL: Result<sql_meta::SqlMappingRef, sql_meta::ArgumentError> =
        Err(sql_meta::ArgumentError::NotValidAsArgument("RateDecision"));
    const RETURN_SQL: Result<sql_meta::ReturnsRef, sql_meta::ReturnsError> = Ok(sql_meta::ReturnsRef::One(
        sql_meta::SqlMappingRef::literal("quota.rate_decision"),
    ));
}

pub fn decision_row(fcinfo: pg_sys::FunctionCallInfo, key: &str, burst: i64, g: &Gcra) -> RateDecision {
    let secs = |ns: i64| ns as f64 / 1e9;
    let retry = g.retry_after_ns.map(|r| secs(r.max(0)));
    let mut values = [
        g.allowed.into_datum(),
        key.into_datum(),
        burst.into_datum(),
        g.remaining.into_datum(),
        secs(g.reset_after_ns.max(0)).into_datum(),
        retry.into_datum(),
    ]
    .map(|d| d.unwrap_or(pg_sys::Datum::from(0)));
    let mut nulls = [false, false, false, false, false, retry.is_none()];
    // SAFETY: fcinfo is this call's, for a function returning quota.rate_decision, whose
    // descriptor result_tupdesc keeps for the life of the backend; the six values are in its
    // column order and of its column types. heap_form_tuple fills in the composite datum's
    // header (length, type, typmod), and no value is a toast pointer (the key is a fresh
    // in-memory text), so the tuple's data is the result datum as it is (what
    // HeapTupleGetDatum returns without toast pointers).
    unsafe {
        let tupdesc = crate::pg::catalog::result_tupdesc(fcinfo);
        let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        RateDecision(pg_sys::Datum::from((*tuple).t_data))
    }
}

pub fn check_rate_key(key: Option<&str>) -> Result<&str, QuotaError> {
    let key = key.ok_or(QuotaError::NullArgument {
        what: "key",
        hint: "Pass the key to limit, e.g. 'user:42'.",
    })?;
    if key.is_empty() {
        return Err(QuotaError::EmptyArgument { what: "key" });
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(QuotaError::TooLong {
            what: "key",
            len: key.len(),
            max: MAX_KEY_BYTES,
        });
    }
    Ok(key)
}

/// Check (and take) `cost` tokens from the bucket of `key`: `rate` tokens per `per`, holding at
/// most `burst` (default `rate`). `cost` 0 peeks. A denied call changes nothing.
#[pg_extern(volatile, parallel_safe)]
fn rate_check(
    key: Option<&str>,
    rate: Option<i64>,
    per: default!(Option<Interval>, "'1 second'"),
    burst: default!(Option<i64>, "NULL"),
    cost: default!(Option<i64>, 1),
    fcinfo: pg_sys::FunctionCallInfo,
) -> RateDecision {
    require_ready();
    let key = check_rate_key(key).or_raise();
    let (t, burst) = crate::rate::policy::rate_params(rate, per, burst).or_raise();
    let cost = cost.unwrap_or(1);
    if cost < 0 {
        QuotaError::Negative {
            what: "cost",
            value: cost,
        }
        .raise();
    }
    let g = check(key.as_bytes(), Kind::Check, t, burst, cost, now_ns());
    metrics::count(Counter::RateChecks);
    if !g.allowed {
        metrics::count(Counter::RateDenials);
    }
    decision_row(fcinfo, key, burst, &g)
}

/// Forget a key's bucket (trusted callers only). True when there was one.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn rate_reset(key: Option<&str>) -> bool {
    request::require_trusted("quota.rate_reset").or_raise();
    require_ready();
    let key = check_rate_key(key).or_raise();
    reset(key.as_bytes())
}

#[cfg(test)]
mod unit {
    use super::gcra;
    const S: i64 = 1_000_000_000;

    #[test]
    fn exactly_burst_then_denied_then_refilled() {
        let t = S / 10; // 10 per second
        let (mut tat, now) = (0, 100 * S);
        for i in 0..5 {
            let g = gcra(tat, now, t, 5, 1);
            assert!(g.allowed, "call {i}");
            assert_eq!(g.remaining, 4 - i);
            tat = g.new_tat.unwrap();
        }
        let g = gcra(tat, now, t, 5, 1);
        assert!(!g.allowed);
        assert_eq!(g.retry_after_ns, Some(t));
        assert!(gcra(tat, now + t, t, 5, 1).allowed);
        assert!(!gcra(tat, now + t - 1, t, 5, 1).allowed);
        assert_eq!(gcra(tat, now, t, 5, 6).retry_after_ns, None);
        assert_eq!(gcra(tat, now, t, 5, 0).new_tat, None);
    }
}

/// The bucket a policy call uses and the limits that apply to it.
struct Resolved<'a> {
    key: Cow<'a, str>,
    policy: crate::rate::policy::Policy,
}

/// Plan and key of the caller for `policy`: the one plan rule (quota.subjects, else the JWT
/// claim app_metadata.plan when it names a plan, else quota_ext.default_plan); callers without
/// a JWT subject are plan `anonymous` keyed by `ip:<client address>` (request::client_ip). The warm path allocates only
/// the key of a caller that does not name one.
fn resolve<'a>(
    policy_name: &str,
    key: Option<&'a str>,
    trusted: bool,
) -> Result<Option<Resolved<'a>>, QuotaError> {
    let policies = crate::rate::policy::policy(policy_name);
    if policies.is_empty() {
        return Ok(None);
    }
    let req = request::request_info()?;
    let default_plan = crate::pg::guc::default_plan_str();
    let caller_plan;
    let plan: &str = match &req.sub {
        Some(sub) => {
            caller_plan = crate::quota::cache::caller_plan(sub, req.plan.as_deref(), &default_plan);
            &caller_plan
        }
        None => "anonymous",
    };
    let own_key = || -> Cow<'a, str> {
        match &req.sub {
            Some(sub) => Cow::Owned(sub.to_string()),
            None => Cow::Owned(format!(
                "ip:{}",
                request::client_ip().as_deref().unwrap_or("unknown")
            )),
        }
    };
    let key = match key {
        None => own_key(),
        Some(k) if trusted || *k == *own_key() => Cow::Borrowed(check_rate_key(Some(k))?),
        Some(k) => {
            return Err(QuotaError::OtherSubject {
                requested: k.to_string(),
            })
        }
    };
    let policy = policies
        .get(plan)
        .or_else(|| policies.get(&*default_plan))
        .copied()
        .ok_or_else(|| QuotaError::NoPolicy {
            policy: policy_name.to_string(),
            plan: plan.to_string(),
        })?;
    Ok(Some(Resolved { key, policy }))
}

/// Longest bucket name formed on the stack (policy, separator, key); longer ones (a key from a
/// very long JWT subject) go to the heap.
const BUCKET_ON_STACK: usize = 640;

fn limit(fcinfo: pg_sys::FunctionCallInfo, policy_name: &str, r: Resolved<'_>, cost: i64) -> RateDecision {
    let len = policy_name.len() + 1 + r.key.len();
    let mut stack = [0u8; BUCKET_ON_STACK];
    let mut heap = Vec::new();
    let bucket: &mut [u8] = if len <= BUCKET_ON_STACK {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    bucket[..policy_name.len()].copy_from_slice(policy_name.as_bytes());
    bucket[policy_name.len()] = 0x1f;
    bucket[policy_name.len() + 1..].copy_from_slice(r.key.as_bytes());
    let bucket: &[u8] = bucket;
    let p = r.policy;
    let mut g = check(bucket, Kind::Policy, p.t_ns, p.burst, cost, now_ns());
    metrics::count(Counter::RateChecks);
    if !g.allowed {
        if p.shadow {
            // A shadow policy counts what it would deny, and allows.
            metrics::count(Counter::ShadowDenials);
            g = Gcra {
                allowed: true,
                retry_after_ns: Some(0),
                ..g
            };
        } else {
            metrics::count(Counter::RateDenials);
        }
    }
    decision_row(fcinfo, &r.key, p.burst, &g)
}

/// Rate-limit the caller by a policy of quota.rate_policies, per plan (see resolve()). `key`
/// NULL means the caller's own: its JWT subject, or `ip:<address>` when anonymous. Its SQL
/// (policy and subject look-ups on a cold cache) runs under a pinned search_path; the warm path
/// runs none.
/// PARALLEL RESTRICTED, as every function that reads the request settings: a parallel
/// worker gets their values but not how they were set (transaction or session).
#[pg_extern(volatile, parallel_restricted)]
fn rate_limit(
    policy: Option<&str>,
    key: default!(Option<&str>, "NULL"),
    cost: default!(Option<i64>, 1),
    fcinfo: pg_sys::FunctionCallInfo,
) -> RateDecision {
    require_ready();
    let policy = request::check_name(
        "policy",
        policy,
        "Pass a policy of quota.rate_policies, e.g. 'default'.",
    )
    .or_raise();
    let cost = cost.unwrap_or(1);
    if cost < 0 {
        QuotaError::Negative {
            what: "cost",
            value: cost,
        }
        .raise();
    }
    let r = resolve(policy, key, request::is_trusted())
        .and_then(|r| {
            r.ok_or(QuotaError::NoPolicy {
                policy: policy.to_string(),
                plan: "any".into(),
            })
        })
        .or_raise();
    limit(fcinfo, policy, r, cost)
}

/// The decision for the current PostgREST request (used by quota.pre_request()): policy `read`
/// for GET and HEAD, `write` otherwise, falling back to `default`. NULL for trusted callers and
/// when no such policy exists.
#[pg_extern(volatile, parallel_restricted)]
fn request_rate_decision(method: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> Option<RateDecision> {
    require_ready();
    if request::is_trusted() {
        return None;
    }
    let first = match method.unwrap_or("GET").to_ascii_uppercase().as_str() {
        "GET" | "HEAD" => "read",
        _ => "write",
    };
    for policy in [first, "default"] {
        if let Some(r) = resolve(policy, None, false).or_raise() {
            return Some(limit(fcinfo, policy, r, 1));
        }
    }
    None
}
