//! Queueing the audit row of a refusal that is about to raise: into the queue in shared memory
//! (queue.rs), with the database's writer (writer.rs) started or woken to write it.

pub use super::queue::Refusal;
use super::queue::{encode, Locked, ENTRY_DATA, HEADER};
use super::writer::{relaunch_stranded, start_writer};
use crate::metrics::{self, Counter};
use pgrx::pg_sys;
use std::sync::atomic::Ordering;

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
        let queued = q.push(&payload, dboid);
        let (wake, ask) = q.header().writer_for(dboid, now, queued);
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
