//! Audit rows for refusals that raise an error.
//!
//! A refusal that raises (an inventory batch without enough quantity, a stale version, ...)
//! aborts the caller's transaction, and an audit row written in it would go with it. Such rows
//! are queued in shared memory instead and written by a background worker of the caller's
//! database, "quota_ext audit writer", in a transaction of its own, normally within a second.
//!
//! The queue is an array of quota_ext.audit_queue_size fixed-size entries (postmaster setting)
//! behind one LWLock, tagged with the database they belong to. A backend that queues a row
//! starts the database's writer when none runs (a dynamic background worker, at most
//! MAX_WRITERS databases at a time; when no background worker slot is free, the next quota or
//! batch call a second later asks again); the writer copies its database's entries out under the
//! lock, writes them without it, and exits once it has been idle for a while, so it never keeps
//! a database from being dropped for long. Nothing that can raise an ERROR or allocate runs
//! while the lock is held.
//!
//! Like every shared-memory structure, the queue survives neither a restart nor a crash: rows
//! queued and not yet written are then lost. A full queue, a row too large for an entry, or a
//! database that is gone before its writer connects lose the row too; each of these is counted
//! in quota.metrics() (audit_dropped), beside audit_queued and audit_written.

use crate::metrics::{self, Counter};
use crate::pg::spi::{self, Stmt};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgBuiltInOids as T;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, Ordering};
use std::time::Duration;

const TRANCHE: &CStr = c"quota_ext_audit_queue";
const SHMEM_NAME: &CStr = c"quota_ext_audit_queue";
/// Bytes of one queued row (its encoded form, see encode). Room for the longest valid call:
/// subject, metric and idempotency key of 256 bytes each, a role name of 64, and details whose
/// strings (a plan name of 256 bytes) may be six times as long once JSON escapes them.
const ENTRY_DATA: usize = 3056;
/// Databases whose writers may run at the same time.
const MAX_WRITERS: usize = 8;
/// A writer that was asked for but never reported in after this long is asked for again.
const STALE_LAUNCH_MICROS: i64 = 10_000_000;
/// A writer with nothing to do for this many consecutive waits exits.
const IDLE_WAITS: u32 = 2;
const WAIT: Duration = Duration::from_millis(500);
/// How soon the postmaster starts a writer again that exited to hand its slot on.
const RESTART: Duration = Duration::from_secs(1);
/// Rows a writer copies out and writes per transaction.
const DRAIN_BATCH: usize = 1024;
/// Rows left without a writer (no free background worker slot) are asked for again after this
/// long, by the next call of a quota or batch function in any database.
const RETRY_MICROS: i64 = 1_000_000;

#[repr(C)]
struct Entry {
    /// Database of the row; 0 marks a free entry.
    dboid: u32,
    len: u32,
    seq: u64,
    data: [u8; ENTRY_DATA],
}

const FREE: u32 = 0;
const STARTING: u32 = 1;
const RUNNING: u32 = 2;

#[repr(C)]
struct Writer {
    dboid: u32,
    state: u32,
    pid: i32,
    asked_at: i64,
    latch: *mut pg_sys::Latch,
}

impl Writer {
    /// Take the slot for `dboid`'s writer, about to be started (under the queue's lock).
    fn claim(&mut self, dboid: u32, now: i64) {
        self.dboid = dboid;
        self.state = STARTING;
        self.pid = 0;
        self.asked_at = now;
        self.latch = std::ptr::null_mut();
    }
    /// Give the slot back (under the queue's lock).
    fn free(&mut self) {
        self.state = FREE;
        self.dboid = 0;
        self.pid = 0;
        self.latch = std::ptr::null_mut();
    }
}

#[repr(C)]
struct Header {
    /// When a writer could not be started for lack of a background worker slot (0: no row is
    /// waiting for one). Atomic, read without the lock by every call that may retry.
    stranded_at: AtomicI64,
    // Everything below is read and written only under the queue's LWLock.
    capacity: u64,
    filled: u64,
    next_seq: u64,
    /// Where the search for a free entry starts (the one after the last taken).
    next_free: u64,
    writers: [Writer; MAX_WRITERS],
}

static HEADER: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());
static ENTRIES: AtomicPtr<Entry> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLock> = AtomicPtr::new(std::ptr::null_mut());

fn capacity() -> usize {
    crate::pg::guc::audit_queue_size()
}

fn shmem_size() -> usize {
    std::mem::size_of::<Header>() + capacity() * std::mem::size_of::<Entry>()
}

/// The audit queue's share of shared memory (from shmem's request hook).
pub fn shmem_request() {
    // SAFETY: called in the postmaster's shmem request phase.
    unsafe {
        pg_sys::RequestAddinShmemSpace(shmem_size());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
    }
}

/// Find or build the audit queue (from shmem's startup hook).
///
/// # Safety
/// Only from the shmem startup hook, after shmem_request asked for the space.
pub unsafe fn shmem_startup() {
    // SAFETY: per this function's contract.
    unsafe {
        let base = crate::pg::shmem::init_struct(SHMEM_NAME, shmem_size(), |base| {
            (*base.cast::<Header>()).capacity = capacity() as u64;
        });
        HEADER.store(base.cast::<Header>(), Ordering::Release);
        ENTRIES.store(
            base.add(std::mem::size_of::<Header>()).cast::<Entry>(),
            Ordering::Release,
        );
        LOCK.store(
            &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock,
            Ordering::Release,
        );
    }
}

/// The queue under its lock: released when dropped. Only memory reads and writes happen while
/// it lives.
struct Locked {
    h: *mut Header,
    entries: *mut Entry,
    lock: *mut pg_sys::LWLock,
}

impl Locked {
    fn acquire() -> Option<Locked> {
        let h = HEADER.load(Ordering::Acquire);
        if h.is_null() {
            return None;
        }
        let lock = LOCK.load(Ordering::Acquire);
        // SAFETY: the lock lives in shared memory for the life of the server.
        unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
        Some(Locked {
            h,
            entries: ENTRIES.load(Ordering::Acquire),
            lock,
        })
    }
    fn header(&mut self) -> &mut Header {
        // SAFETY: exclusive lock held.
        unsafe { &mut *self.h }
    }
    fn entry(&mut self, i: usize) -> &mut Entry {
        // SAFETY: exclusive lock held; i < capacity.
        unsafe { &mut *self.entries.add(i) }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: acquired in Locked::acquire.
        unsafe { pg_sys::LWLockRelease(self.lock) };
    }
}

/// Rows waiting in the queue now (None without the preload).
pub fn depth() -> Option<i64> {
    let mut q = Locked::acquire()?;
    Some(q.header().filled as i64)
}

/// What a refusal writes to quota.audit_log (success is false).
pub struct Refusal<'a> {
    pub subject: Option<&'a str>,
    pub action: &'a str,
    pub metric: Option<&'a str>,
    pub amount: Option<i64>,
    pub reason: &'a str,
    pub details: serde_json::Value,
    pub idempotency_key: Option<&'a str>,
}

/// Queue the audit row of a refusal that is about to raise (subject to quota_ext.audit), and
/// make sure the database's writer runs. Without the preload there is no queue and nothing is
/// written.
pub fn refusal(r: Refusal<'_>) {
    if !crate::pg::guc::audit_wanted(false) || HEADER.load(Ordering::Acquire).is_null() {
        return;
    }
    relaunch_stranded();
    let actor = crate::request::actor();
    let payload = encode(&r, actor.as_deref());
    if payload.len() > ENTRY_DATA {
        // Not reachable for the arguments the functions accept (see encode); counted if it were.
        metrics::count(Counter::AuditRejected);
        return;
    }
    // SAFETY: backend globals, set at connection start.
    let (dboid, now) = (unsafe { pg_sys::MyDatabaseId }.to_u32(), unsafe {
        pg_sys::GetCurrentTimestamp()
    });
    let (queued, wake, ask) = {
        let Some(mut q) = Locked::acquire() else { return };
        let cap = q.header().capacity as usize;
        let mut queued = false;
        if (q.header().filled as usize) < cap {
            let start = q.header().next_free as usize % cap;
            if let Some(i) = (0..cap)
                .map(|k| (start + k) % cap)
                .find(|&i| q.entry(i).dboid == 0)
            {
                let seq = q.header().next_seq;
                let e = q.entry(i);
                e.data[..payload.len()].copy_from_slice(&payload);
                e.len = payload.len() as u32;
                e.seq = seq;
                e.dboid = dboid;
                let h = q.header();
                h.next_seq += 1;
                h.filled += 1;
                h.next_free = ((i + 1) % cap) as u64;
                queued = true;
            }
        }
        let h = q.header();
        let mut wake = std::ptr::null_mut();
        let mut ask = None;
        match h.writers.iter().position(|w| w.state != FREE && w.dboid == dboid) {
            Some(i) if h.writers[i].state == RUNNING => wake = h.writers[i].latch,
            Some(i) if now - h.writers[i].asked_at > STALE_LAUNCH_MICROS => {
                h.writers[i].asked_at = now;
                ask = Some(i);
            }
            Some(_) => {}
            None => match h.writers.iter().position(|w| w.state == FREE) {
                Some(i) => {
                    h.writers[i].claim(dboid, now);
                    ask = Some(i);
                }
                // Every writer slot is busy with another database: the row waits, and the
                // first slot to free up takes it (a writer that goes idle hands its slot on,
                // relaunch_stranded asks again).
                None if queued => {
                    let _ =
                        h.stranded_at
                            .compare_exchange(0, now.max(1), Ordering::Relaxed, Ordering::Relaxed);
                }
                None => {}
            },
        }
        (queued, wake, ask)
    };
    metrics::count(if queued {
        Counter::AuditQueued
    } else {
        Counter::AuditRejected
    });
    if !wake.is_null() {
        // SAFETY: a latch inside a PGPROC in shared memory; setting the latch of a process that
        // has exited meanwhile is harmless.
        unsafe { pg_sys::SetLatch(wake) };
    }
    if let Some(i) = ask {
        start_writer(i);
    }
}

/// A queued row: its fields as raw bytes, each behind its length (u16; u16::MAX for NULL), so
/// no escaping can make a valid row outgrow its entry. Details that still do not fit (they
/// cannot for any call the functions accept) are replaced by a note saying so, never the row.
fn encode(r: &Refusal<'_>, actor: Option<&str>) -> Vec<u8> {
    let details = r.details.to_string();
    let mut out = Vec::with_capacity(64 + details.len());
    out.extend_from_slice(&crate::quota::decision::now_micros().to_le_bytes());
    match r.amount {
        Some(a) => {
            out.push(1);
            out.extend_from_slice(&a.to_le_bytes());
        }
        None => out.push(0),
    }
    let text = |v: Option<&str>, out: &mut Vec<u8>| match v {
        Some(t) => {
            let t = &t.as_bytes()[..t.len().min(u16::MAX as usize - 1)];
            out.extend_from_slice(&(t.len() as u16).to_le_bytes());
            out.extend_from_slice(t);
        }
        None => out.extend_from_slice(&u16::MAX.to_le_bytes()),
    };
    for v in [
        r.subject,
        Some(r.action),
        r.metric,
        Some(r.reason),
        r.idempotency_key,
        actor,
    ] {
        text(v, &mut out);
    }
    let room = ENTRY_DATA.saturating_sub(out.len() + 2);
    if details.len() <= room {
        text(Some(&details), &mut out);
    } else {
        let note = serde_json::json!({"details_omitted_bytes": details.len()}).to_string();
        text(Some(&note), &mut out);
    }
    out
}

/// One decoded row, as the writer inserts it.
struct Decoded {
    t: i64,
    amount: Option<i64>,
    texts: [Option<String>; 7],
}

fn decode(mut b: &[u8]) -> Option<Decoded> {
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        b = rest;
        Some(head)
    };
    let t = i64::from_le_bytes(take(8)?.try_into().ok()?);
    let amount = match take(1)?[0] {
        1 => Some(i64::from_le_bytes(take(8)?.try_into().ok()?)),
        _ => None,
    };
    let mut texts: [Option<String>; 7] = Default::default();
    for slot in texts.iter_mut() {
        let len = u16::from_le_bytes(take(2)?.try_into().ok()?);
        if len != u16::MAX {
            *slot = Some(String::from_utf8_lossy(take(len as usize)?).into_owned());
        }
    }
    Some(Decoded { t, amount, texts })
}

thread_local! {
    static LAST_LAUNCH_FAILURE_LOG: std::cell::Cell<i64> = const { std::cell::Cell::new(i64::MIN / 2) };
}

fn start_writer(slot: usize) {
    let started = BackgroundWorkerBuilder::new("quota_ext audit writer")
        .set_type("quota_ext audit writer")
        .set_library("quota_ext")
        .set_function("quota_ext_audit_writer_main")
        .enable_spi_access()
        // Restarted by the postmaster a second after it exits with code 1, which it does to
        // hand its slot on or to come back for rows left behind (see carry_on); an exit with
        // code 0 (idle) unregisters it.
        .set_restart_time(Some(RESTART))
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .load_dynamic()
        .is_ok();
    if !started {
        // No free background worker slot (max_worker_processes, shared with parallel query):
        // the rows stay queued, and relaunch_stranded() asks again a second later.
        // SAFETY: reads the backend's clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        if let Some(mut q) = Locked::acquire() {
            let w = &mut q.header().writers[slot];
            if w.state == STARTING && w.pid == 0 {
                w.free();
            }
            q.header().stranded_at.store(now.max(1), Ordering::Relaxed);
        }
        // Once a minute per backend at most: every refusal would otherwise log it.
        if now - LAST_LAUNCH_FAILURE_LOG.get() > 60_000_000 {
            LAST_LAUNCH_FAILURE_LOG.set(now);
            pgrx::log!(
                "quota_ext: could not start the audit writer (no free background worker slot, see max_worker_processes); refusal audit rows stay queued and it is asked for again"
            );
        }
    }
}

/// Start writers for queued rows that have none because an earlier start found no free
/// background worker slot. Called by every quota and batch function: when nothing is stranded
/// it is one relaxed atomic load; otherwise one call a second in the whole server looks.
pub fn relaunch_stranded() {
    let h = HEADER.load(Ordering::Acquire);
    if h.is_null() {
        return;
    }
    // SAFETY: the header lives as long as shared memory; the field is atomic.
    let stranded = unsafe { &(*h).stranded_at };
    let since = stranded.load(Ordering::Relaxed);
    if since == 0 {
        return;
    }
    // SAFETY: reads the backend's clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if now - since < RETRY_MICROS
        || stranded
            .compare_exchange(since, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return; // too soon, or another backend is looking
    }
    let mut ask = [0usize; MAX_WRITERS];
    let mut n = 0;
    let mut served = true;
    {
        let Some(mut q) = Locked::acquire() else { return };
        let cap = q.header().capacity as usize;
        for i in 0..cap {
            let db = q.entry(i).dboid;
            let h = q.header();
            if db == 0 || h.writers.iter().any(|w| w.state != FREE && w.dboid == db) {
                continue;
            }
            let Some(s) = h.writers.iter().position(|w| w.state == FREE) else {
                served = false; // all writer slots busy: look again later
                break;
            };
            h.writers[s].claim(db, now);
            ask[n] = s;
            n += 1;
        }
        if served {
            // Cleared before the starts below: one that fails sets it again.
            let _ = stranded.compare_exchange(now, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
    for &s in &ask[..n] {
        start_writer(s);
    }
}

static CONNECTED: AtomicBool = AtomicBool::new(false);

/// On exit (idle, SIGTERM, an error, or a database that could not be connected to): give the
/// writer slot back if it is still ours, and drop the rows of a database that is gone.
#[pg_guard]
unsafe extern "C-unwind" fn writer_exit(_code: i32, arg: pg_sys::Datum) {
    let slot = arg.value();
    // SAFETY: backend global.
    let me = unsafe { pg_sys::MyProcPid };
    let Some(mut q) = Locked::acquire() else { return };
    let w = &q.header().writers[slot];
    if w.pid != me {
        return;
    }
    let dboid = w.dboid;
    let mut dropped = 0;
    if !CONNECTED.load(Ordering::Relaxed) {
        let cap = q.header().capacity as usize;
        for i in 0..cap {
            if q.entry(i).dboid == dboid {
                q.entry(i).dboid = 0;
                dropped += 1;
            }
        }
        q.header().filled -= dropped;
    }
    q.header().writers[slot].free();
    // Terminated (pg_terminate_backend, DROP DATABASE ... FORCE, an error) with rows still
    // queued, of this database or of one that waited for a slot: the next quota_ext call of any
    // backend, or a running writer, starts writers for them at once.
    if q.header().filled > 0 {
        q.header().stranded_at.store(1, Ordering::Relaxed);
    }
    drop(q);
    metrics::count_n(Counter::AuditDropped, dropped);
}

static WRITE: Stmt = Stmt {
    sql: "INSERT INTO quota.audit_log
                 (created_at, subject, action, metric, amount, success, reason, details, idempotency_key, actor)
          SELECT t, s, a, m, n, false, r, d::jsonb, k, w
            FROM ROWS FROM (pg_catalog.unnest($1::timestamptz[]), pg_catalog.unnest($2::text[]),
                            pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[]),
                            pg_catalog.unnest($5::bigint[]), pg_catalog.unnest($6::text[]),
                            pg_catalog.unnest($7::text[]), pg_catalog.unnest($8::text[]),
                            pg_catalog.unnest($9::text[]))
                 AS q(t, s, a, m, n, r, d, k, w)",
    args: &[
        T::TIMESTAMPTZARRAYOID,
        T::TEXTARRAYOID,
        T::TEXTARRAYOID,
        T::TEXTARRAYOID,
        T::INT8ARRAYOID,
        T::TEXTARRAYOID,
        T::TEXTARRAYOID,
        T::TEXTARRAYOID,
        T::TEXTARRAYOID,
    ],
};

/// WRITE on the tables of a version before 0.6.0 (see catalog::audit_has_actor).
static WRITE_0_5: Stmt = Stmt {
    sql: "INSERT INTO quota.audit_log
                 (created_at, subject, action, metric, amount, success, reason, details, idempotency_key)
          SELECT t, s, a, m, n, false, r, d::jsonb, k
            FROM ROWS FROM (pg_catalog.unnest($1::timestamptz[]), pg_catalog.unnest($2::text[]),
                            pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[]),
                            pg_catalog.unnest($5::bigint[]), pg_catalog.unnest($6::text[]),
                            pg_catalog.unnest($7::text[]), pg_catalog.unnest($8::text[]))
                 AS q(t, s, a, m, n, r, d, k)",
    args: WRITE.args,
};

/// The background worker: one per database with queued rows.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn quota_ext_audit_writer_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let slot = arg.value();
    if slot >= MAX_WRITERS {
        return;
    }
    // SAFETY: backend globals of this worker process.
    let (me, latch) = unsafe { (pg_sys::MyProcPid, &raw mut (*pg_sys::MyProc).procLatch) };
    let dboid = {
        let Some(mut q) = Locked::acquire() else { return };
        let w = &mut q.header().writers[slot];
        if w.state != STARTING || w.pid != 0 {
            return; // given up on as stale and taken over meanwhile
        }
        w.state = RUNNING;
        w.pid = me;
        w.latch = latch;
        w.dboid
    };
    // SAFETY: registers a callback of this process, run on its exit.
    unsafe { pg_sys::on_shmem_exit(Some(writer_exit), pg_sys::Datum::from(slot)) };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(dboid)), None);
    CONNECTED.store(true, Ordering::Relaxed);
    // The writer runs as the bootstrap superuser: resolve nothing through a schema others can
    // create objects in.
    // SAFETY: plain setting of this process.
    unsafe {
        pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }

    let cap = HEADER.load(Ordering::Acquire);
    // SAFETY: capacity is set once at start-up and never changes.
    let cap = unsafe { (*cap).capacity } as usize;
    // Copied out under the lock, at most DRAIN_BATCH rows at a time, into memory reserved
    // beforehand: no allocation under it.
    let batch = cap.min(DRAIN_BATCH);
    let mut bytes: Vec<u8> = Vec::with_capacity(batch * ENTRY_DATA);
    let mut found: Vec<(u64, usize, usize)> = Vec::with_capacity(batch);
    let mut idle = 0;
    loop {
        bytes.clear();
        found.clear();
        let exit: Option<bool> = {
            let Some(mut q) = Locked::acquire() else { return };
            for i in 0..cap {
                if found.len() == batch {
                    break;
                }
                let e = q.entry(i);
                if e.dboid == dboid {
                    let len = e.len as usize;
                    found.push((e.seq, bytes.len(), len));
                    bytes.extend_from_slice(&e.data[..len]);
                    e.dboid = 0;
                }
            }
            q.header().filled -= found.len() as u64;
            if found.is_empty() && idle >= IDLE_WAITS {
                // Give the slot back under the same lock a backend queues under: a row queued
                // after this starts a new writer. Rows of a database that found every slot busy
                // get it instead, with a writer started for them below.
                let mut waiting = None;
                for i in 0..cap {
                    let db = q.entry(i).dboid;
                    if db != 0
                        && !q
                            .header()
                            .writers
                            .iter()
                            .any(|w| w.state != FREE && w.dboid == db)
                    {
                        waiting = Some(db);
                        break;
                    }
                }
                // SAFETY: reads the backend's clock.
                let now = unsafe { pg_sys::GetCurrentTimestamp() };
                match waiting {
                    Some(db) => q.header().writers[slot].claim(db, now),
                    None => q.header().writers[slot].free(),
                }
                Some(waiting.is_some())
            } else {
                None
            }
        };
        match exit {
            // The slot now names a database whose rows found every slot busy. This process
            // still holds its background worker slot, so it cannot start another writer
            // (with max_worker_processes small there may be no other): it exits with code 1,
            // and the postmaster starts it again, for the slot's new database.
            Some(true) => carry_on(),
            Some(false) => return,
            None => {}
        }
        // A slot a terminated writer left, or rows that waited for one: started from here too.
        relaunch_stranded();
        if found.is_empty() {
            idle += 1;
        } else {
            idle = 0;
            found.sort_unstable_by_key(|f| f.0);
            write(&bytes, &found);
            if found.len() == batch {
                if BackgroundWorker::sigterm_received() {
                    return;
                }
                continue; // more may be waiting
            }
        }
        if !BackgroundWorker::wait_latch(Some(WAIT)) {
            // SIGTERM (pg_terminate_backend, DROP DATABASE ... FORCE elsewhere, shutdown) or
            // postmaster death. Rows of this database still queued: come back for them (the
            // postmaster restarts no worker while it shuts down; a database being dropped
            // fails the restart's connection, which drops its rows, see writer_exit).
            let left = {
                let Some(mut q) = Locked::acquire() else { return };
                let mut left = false;
                for i in 0..cap {
                    left |= q.entry(i).dboid == dboid;
                }
                if left {
                    // SAFETY: reads the backend's clock.
                    let now = unsafe { pg_sys::GetCurrentTimestamp() };
                    q.header().writers[slot].claim(dboid, now);
                }
                left
            };
            if left {
                carry_on();
            }
            return;
        }
    }
}

/// Exit so that the postmaster starts this worker again for its slot (see start_writer). The
/// slot says STARTING with no process, so writer_exit leaves it alone and the new process
/// takes it.
fn carry_on() -> ! {
    // SAFETY: ends this background worker process, running its exit callbacks.
    unsafe { pg_sys::proc_exit(1) }
}

fn write(bytes: &[u8], found: &[(u64, usize, usize)]) {
    let mut t = Vec::with_capacity(found.len());
    let mut n = Vec::with_capacity(found.len());
    let mut cols: [Vec<Option<String>>; 7] = Default::default();
    for &(_, off, len) in found {
        let Some(row) = decode(&bytes[off..off + len]) else {
            metrics::count(Counter::AuditDropped);
            continue;
        };
        t.push(TimestampWithTimeZone::try_from(row.t).ok());
        n.push(row.amount);
        for (col, v) in cols.iter_mut().zip(row.texts) {
            col.push(v);
        }
    }
    // subject, action, metric, reason, key, actor, details (encode's order)
    let [s, a, m, r, k, w, d] = cols;
    let rows = t.len();
    // An error (the extension dropped meanwhile, say) ends the writer; its rows are counted
    // as lost first.
    PgTryBuilder::new(move || {
        BackgroundWorker::transaction(move || {
            // As the extension owner, as the functions that queued the rows would have written
            // them (the worker itself connects as the bootstrap superuser).
            let _owner = crate::request::AsOwner::enter();
            Spi::connect_mut(|client| {
                let stmt = if crate::pg::catalog::audit_has_actor() {
                    &WRITE
                } else {
                    &WRITE_0_5
                };
                spi::run(
                    client,
                    stmt,
                    &[
                        t.into(),
                        s.into(),
                        a.into(),
                        m.into(),
                        n.into(),
                        r.into(),
                        d.into(),
                        k.into(),
                        w.into(),
                    ],
                );
            })
        })
    })
    .catch_others(|e| {
        metrics::count_n(Counter::AuditDropped, rows as u64);
        e.rethrow()
    })
    .execute();
    metrics::count_n(Counter::AuditWritten, rows as u64);
}
