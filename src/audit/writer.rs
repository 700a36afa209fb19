//! The audit writer: a dynamic background worker per database with queued rows, started by the
//! backend that queues one, which copies the rows out under the queue's lock, inserts them in a
//! transaction of its own, and exits once idle.

use super::queue::decode;
use super::queue::Locked;
use super::queue::DRAIN_BATCH;
use super::queue::ENTRY_DATA;
use super::queue::FREE;
use super::queue::HEADER;
use super::queue::IDLE_WAITS;
use super::queue::MAX_WRITERS;
use super::queue::RESTART;
use super::queue::RETRY_MICROS;
use super::queue::RUNNING;
use super::queue::STARTING;
use super::queue::WAIT;
use crate::metrics::{self, Counter};
use crate::pg::spi::{self, Stmt};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgBuiltInOids as T;
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    static LAST_LAUNCH_FAILURE_LOG: std::cell::Cell<i64> = const { std::cell::Cell::new(i64::MIN / 2) };
}

pub(super) fn start_writer(slot: usize) {
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

/// Since when queued rows have waited for a background worker slot for their writer (a
/// timestamptz's microseconds); None when none waits (or without the preload).
pub fn stranded_since() -> Option<i64> {
    let h = HEADER.load(Ordering::Acquire);
    if h.is_null() {
        return None;
    }
    // SAFETY: the header lives as long as shared memory; the field is atomic.
    let since = unsafe { (*h).stranded_at.load(Ordering::Relaxed) };
    (since != 0).then_some(since)
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

/// The queued rows, one array per column. `$actor_column` and `$actor_value` name the actor (none
/// on the tables of a version before 0.6.0, see catalog::audit_has_actor).
macro_rules! write_rows {
    ($actor_column:literal, $actor_value:literal) => {
        concat!(
            "INSERT INTO quota.audit_log
                 (created_at, subject, action, metric, amount, success, reason, details, idempotency_key",
            $actor_column,
            ")
          SELECT t, s, a, m, n, false, r, d::jsonb, k",
            $actor_value,
            "
            FROM ROWS FROM (pg_catalog.unnest($1::timestamptz[]), pg_catalog.unnest($2::text[]),
                            pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[]),
                            pg_catalog.unnest($5::bigint[]), pg_catalog.unnest($6::text[]),
                            pg_catalog.unnest($7::text[]), pg_catalog.unnest($8::text[]),
                            pg_catalog.unnest($9::text[]))
                 AS q(t, s, a, m, n, r, d, k, w)"
        )
    };
}

static WRITE: Stmt = Stmt {
    sql: write_rows!(", actor", ", w"),
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

static WRITE_0_5: Stmt = Stmt {
    sql: write_rows!("", ""),
    args: WRITE.args,
};

/// The background worker: one per database with queued rows.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn quota_ext_audit_writer_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let slot = arg.value();
    let Some(dboid) = take_slot(slot) else { return };
    // SAFETY: registers a callback of this process, run on its exit.
    unsafe { pg_sys::on_shmem_exit(Some(writer_exit), pg_sys::Datum::from(slot)) };
    connect(dboid);
    drain(slot, dboid);
}

/// Take the writer slot this process was started for; None when it was given up on as stale
/// and taken over meanwhile (or the queue is gone).
fn take_slot(slot: usize) -> Option<u32> {
    if slot >= MAX_WRITERS {
        return None;
    }
    // SAFETY: backend globals of this worker process.
    let (me, latch) = unsafe { (pg_sys::MyProcPid, &raw mut (*pg_sys::MyProc).procLatch) };
    let mut q = Locked::acquire()?;
    let w = &mut q.header().writers[slot];
    if w.state != STARTING || w.pid != 0 {
        return None;
    }
    w.state = RUNNING;
    w.pid = me;
    w.latch = latch;
    Some(w.dboid)
}

fn connect(dboid: u32) {
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
}

/// Rows copied out of the queue: their bytes, and per row (sequence, offset, length).
struct Taken {
    bytes: Vec<u8>,
    found: Vec<(u64, usize, usize)>,
}

/// What the writer does after a look at the queue.
enum Next {
    Write,
    /// Idle long enough: the slot was given back (false) or handed to a database whose rows
    /// found every slot busy (true).
    Leave(bool),
}

/// Write the database's rows as they come, until idle or told to stop.
fn drain(slot: usize, dboid: u32) {
    let cap = HEADER.load(Ordering::Acquire);
    // SAFETY: capacity is set once at start-up and never changes.
    let cap = unsafe { (*cap).capacity } as usize;
    // Copied out under the lock, at most DRAIN_BATCH rows at a time, into memory reserved
    // beforehand: no allocation under it.
    let batch = cap.min(DRAIN_BATCH);
    let mut taken = Taken {
        bytes: Vec::with_capacity(batch * ENTRY_DATA),
        found: Vec::with_capacity(batch),
    };
    let mut idle = 0;
    loop {
        let Some(next) = take_rows(slot, dboid, cap, batch, idle >= IDLE_WAITS, &mut taken) else {
            return;
        };
        match next {
            // The slot now names a database whose rows found every slot busy. This process
            // still holds its background worker slot, so it cannot start another writer
            // (with max_worker_processes small there may be no other): it exits with code 1,
            // and the postmaster starts it again, for the slot's new database.
            Next::Leave(true) => carry_on(),
            Next::Leave(false) => return,
            Next::Write => {}
        }
        // A slot a terminated writer left, or rows that waited for one: started from here too.
        relaunch_stranded();
        if taken.found.is_empty() {
            idle += 1;
        } else {
            idle = 0;
            taken.found.sort_unstable_by_key(|f| f.0);
            write(&taken.bytes, &taken.found);
            if taken.found.len() == batch {
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
            if rows_left(slot, dboid, cap) {
                carry_on();
            }
            return;
        }
    }
}

/// Copy up to `batch` of the database's rows out of the queue into `taken`, freeing their
/// entries. With none and `leave` set, give the slot up under the same lock. None: the queue
/// is gone.
fn take_rows(
    slot: usize,
    dboid: u32,
    cap: usize,
    batch: usize,
    leave: bool,
    taken: &mut Taken,
) -> Option<Next> {
    taken.bytes.clear();
    taken.found.clear();
    let mut q = Locked::acquire()?;
    for i in 0..cap {
        if taken.found.len() == batch {
            break;
        }
        let e = q.entry(i);
        if e.dboid == dboid {
            let len = e.len as usize;
            taken.found.push((e.seq, taken.bytes.len(), len));
            taken.bytes.extend_from_slice(&e.data[..len]);
            e.dboid = 0;
        }
    }
    q.header().filled -= taken.found.len() as u64;
    if !taken.found.is_empty() || !leave {
        return Some(Next::Write);
    }
    // Give the slot back under the same lock a backend queues under: a row queued after this
    // starts a new writer. Rows of a database that found every slot busy get it instead, with
    // a writer started for them (see drain).
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
    Some(Next::Leave(waiting.is_some()))
}

/// Whether rows of the database are still queued; if so, the slot is claimed again for it so
/// that the restarted process takes it.
fn rows_left(slot: usize, dboid: u32, cap: usize) -> bool {
    let Some(mut q) = Locked::acquire() else {
        return false;
    };
    let left = (0..cap).any(|i| q.entry(i).dboid == dboid);
    if left {
        // SAFETY: reads the backend's clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        q.header().writers[slot].claim(dboid, now);
    }
    left
}

/// Exit so that the postmaster starts this worker again for its slot (see start_writer). The
/// slot says STARTING with no process, so writer_exit leaves it alone and the new process
/// takes it.
#[allow(unreachable_code)] // proc_exit is declared noreturn in some versions' bindings only
fn carry_on() -> ! {
    // SAFETY: ends this background worker process, running its exit callbacks.
    unsafe { pg_sys::proc_exit(1) };
    unreachable!("proc_exit returned")
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
                // A row that concerns no subject: '' (NULL before 0.9.0, see
                // catalog::audit_no_subject).
                let no_subject = crate::pg::catalog::audit_no_subject();
                let s: Vec<Option<String>> = s
                    .into_iter()
                    .map(|v| {
                        v.filter(|v| !v.is_empty())
                            .or_else(|| no_subject.map(String::from))
                    })
                    .collect();
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
