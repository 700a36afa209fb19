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

use pgrx::pg_sys;
use std::ffi::CStr;
use std::sync::atomic::{AtomicI64, AtomicPtr, Ordering};
use std::time::Duration;

const TRANCHE: &CStr = c"quota_ext_audit_queue";
const SHMEM_NAME: &CStr = c"quota_ext_audit_queue";
/// Bytes of one queued row (its encoded form, see encode). Room for the longest valid call:
/// subject, metric and idempotency key of 256 bytes each, a role name of 64, and details whose
/// strings (a plan name of 256 bytes) may be six times as long once JSON escapes them.
pub(super) const ENTRY_DATA: usize = 3056;
/// Databases whose writers may run at the same time.
pub(super) const MAX_WRITERS: usize = 8;
/// A writer that was asked for but never reported in after this long is asked for again.
const STALE_LAUNCH_MICROS: i64 = 10_000_000;
/// A writer with nothing to do for this many consecutive waits exits.
pub(super) const IDLE_WAITS: u32 = 2;
pub(super) const WAIT: Duration = Duration::from_millis(500);
/// How soon the postmaster starts a writer again that exited to hand its slot on.
pub(super) const RESTART: Duration = Duration::from_secs(1);
/// Rows a writer copies out and writes per transaction.
pub(super) const DRAIN_BATCH: usize = 1024;
/// Rows left without a writer (no free background worker slot) are asked for again after this
/// long, by the next call of a quota or batch function in any database.
pub(super) const RETRY_MICROS: i64 = 1_000_000;

#[repr(C)]
pub(super) struct Entry {
    /// Database of the row; 0 marks a free entry.
    pub(super) dboid: u32,
    pub(super) len: u32,
    pub(super) seq: u64,
    pub(super) data: [u8; ENTRY_DATA],
}

pub(super) const FREE: u32 = 0;
pub(super) const STARTING: u32 = 1;
pub(super) const RUNNING: u32 = 2;

#[repr(C)]
pub(super) struct Writer {
    pub(super) dboid: u32,
    pub(super) state: u32,
    pub(super) pid: i32,
    pub(super) asked_at: i64,
    pub(super) latch: *mut pg_sys::Latch,
}

impl Writer {
    /// Take the slot for `dboid`'s writer, about to be started (under the queue's lock).
    pub(super) fn claim(&mut self, dboid: u32, now: i64) {
        self.dboid = dboid;
        self.state = STARTING;
        self.pid = 0;
        self.asked_at = now;
        self.latch = std::ptr::null_mut();
    }
    /// Give the slot back (under the queue's lock).
    pub(super) fn free(&mut self) {
        self.state = FREE;
        self.dboid = 0;
        self.pid = 0;
        self.latch = std::ptr::null_mut();
    }
}

#[repr(C)]
pub(super) struct Header {
    /// When a writer could not be started for lack of a background worker slot (0: no row is
    /// waiting for one). Atomic, read without the lock by every call that may retry.
    pub(super) stranded_at: AtomicI64,
    // Everything below is read and written only under the queue's LWLock.
    pub(super) capacity: u64,
    pub(super) filled: u64,
    pub(super) next_seq: u64,
    /// Where the search for a free entry starts (the one after the last taken).
    pub(super) next_free: u64,
    pub(super) writers: [Writer; MAX_WRITERS],
}

impl Header {
    /// The writer of the database after a row was queued (or refused, `queued` false): the
    /// latch of the one running, to wake it, or the slot whose writer is to be started (a free
    /// one claimed, or one asked for long ago without a process showing up).
    pub(super) fn writer_for(
        &mut self,
        dboid: u32,
        now: i64,
        queued: bool,
    ) -> (*mut pg_sys::Latch, Option<usize>) {
        let mut wake = std::ptr::null_mut();
        let mut ask = None;
        match self
            .writers
            .iter()
            .position(|w| w.state != FREE && w.dboid == dboid)
        {
            Some(i) if self.writers[i].state == RUNNING => wake = self.writers[i].latch,
            Some(i) if now - self.writers[i].asked_at > STALE_LAUNCH_MICROS => {
                self.writers[i].asked_at = now;
                ask = Some(i);
            }
            Some(_) => {}
            None => match self.writers.iter().position(|w| w.state == FREE) {
                Some(i) => {
                    self.writers[i].claim(dboid, now);
                    ask = Some(i);
                }
                // Every writer slot is busy with another database: the row waits, and the
                // first slot to free up takes it (a writer that goes idle hands its slot on,
                // relaunch_stranded asks again).
                None if queued => {
                    let _ = self.stranded_at.compare_exchange(
                        0,
                        now.max(1),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                None => {}
            },
        }
        (wake, ask)
    }
}

pub(super) static HEADER: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());
static ENTRIES: AtomicPtr<Entry> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLock> = AtomicPtr::new(std::ptr::null_mut());

pub(super) fn capacity() -> usize {
    crate::pg::guc::audit_queue_size()
}

fn shmem_size() -> usize {
    std::mem::size_of::<Header>() + capacity() * std::mem::size_of::<Entry>()
}

/// The audit queue's share of shared memory (from shmem's request hook).
pub fn shmem_request() {
    // SAFETY: called in the postmaster's shmem request phase.
    unsafe { crate::pg::shmem::request(shmem_size(), TRANCHE, 1) };
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
pub(super) struct Locked {
    h: *mut Header,
    entries: *mut Entry,
    lock: *mut pg_sys::LWLock,
}

impl Locked {
    pub(super) fn acquire() -> Option<Locked> {
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
    pub(super) fn header(&mut self) -> &mut Header {
        // SAFETY: exclusive lock held.
        unsafe { &mut *self.h }
    }
    pub(super) fn entry(&mut self, i: usize) -> &mut Entry {
        // SAFETY: exclusive lock held; i < capacity.
        unsafe { &mut *self.entries.add(i) }
    }

    /// Put a row of the database into a free entry; false when the queue is full.
    pub(super) fn push(&mut self, payload: &[u8], dboid: u32) -> bool {
        let cap = self.header().capacity as usize;
        if (self.header().filled as usize) >= cap {
            return false;
        }
        let start = self.header().next_free as usize % cap;
        let Some(i) = (0..cap)
            .map(|k| (start + k) % cap)
            .find(|&i| self.entry(i).dboid == 0)
        else {
            return false;
        };
        let seq = self.header().next_seq;
        let e = self.entry(i);
        e.data[..payload.len()].copy_from_slice(payload);
        e.len = payload.len() as u32;
        e.seq = seq;
        e.dboid = dboid;
        let h = self.header();
        h.next_seq += 1;
        h.filled += 1;
        h.next_free = ((i + 1) % cap) as u64;
        true
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

/// A queued row: its fields as raw bytes, each behind its length (u16; u16::MAX for NULL), so
/// no escaping can make a valid row outgrow its entry. Details that still do not fit (they
/// cannot for any call the functions accept) are replaced by a note saying so, never the row.
pub(super) fn encode(r: &Refusal<'_>, actor: Option<&str>) -> Vec<u8> {
    let details = r.details.to_string();
    let mut out = Vec::with_capacity(64 + details.len());
    out.extend_from_slice(&crate::pg::now_micros().to_le_bytes());
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
pub(super) struct Decoded {
    pub(super) t: i64,
    pub(super) amount: Option<i64>,
    pub(super) texts: [Option<String>; 7],
}

pub(super) fn decode(mut b: &[u8]) -> Option<Decoded> {
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
