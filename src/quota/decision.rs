//! The `quota.decision` row: what consume, refund and status answer.

use crate::pg::catalog;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgTupleDesc};
use serde_json::json;

pub type DecisionRow = pgrx::composite_type!('static, "quota.decision");

/// One calendar window of one subject and period, with its limit and usage.
#[derive(Clone, Debug)]
pub struct Window {
    /// Whose window: the subject charged, or one of its ancestors (pooled quotas).
    pub subject: String,
    pub period: String,
    pub limit: i64,
    /// Microseconds since 2000-01-01 UTC, PostgreSQL's timestamptz.
    pub start: i64,
    pub reset_at: Option<i64>,
    pub used: i64,
}

impl Window {
    pub fn remaining(&self) -> i64 {
        self.limit.saturating_sub(self.used).max(0)
    }
}

#[derive(Clone, Debug)]
pub struct Decision {
    pub allowed: bool,
    pub subject: String,
    pub metric: String,
    pub period: Option<String>,
    pub used: i64,
    pub limit: i64,
    pub remaining: i64,
    pub reset_at: Option<i64>,
    pub retry_after_seconds: Option<i32>,
    pub replayed: bool,
    /// The subject whose window binds: the subject itself or an ancestor.
    pub binding_subject: Option<String>,
}

use crate::pg::now_micros;

impl Decision {
    /// `w` is the binding window. `outright` means the amount can never fit its limit.
    pub fn from_window(subject: &str, metric: &str, w: &Window, allowed: bool, outright: bool) -> Self {
        let retry = if allowed {
            Some(0)
        } else if outright {
            None
        } else {
            w.reset_at.map(|r| {
                let micros = (r - now_micros()).max(0);
                ((micros + 999_999) / 1_000_000).min(i32::MAX as i64) as i32
            })
        };
        Decision {
            allowed,
            subject: subject.to_string(),
            metric: metric.to_string(),
            period: Some(w.period.clone()),
            used: w.used,
            limit: w.limit,
            remaining: w.remaining(),
            reset_at: w.reset_at,
            retry_after_seconds: retry,
            replayed: false,
            binding_subject: Some(w.subject.clone()),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "allowed": self.allowed,
            "subject": self.subject,
            "metric": self.metric,
            "period": self.period,
            "used": self.used,
            "quota_limit": self.limit,
            "remaining": self.remaining,
            "reset_at": self.reset_at.map(iso8601),
            "retry_after_seconds": self.retry_after_seconds,
            "replayed": self.replayed,
            "binding_subject": self.binding_subject,
        })
    }

    /// As a `quota.decision` row. With the call's `fcinfo` (plain functions), the row type is
    /// resolved once per backend (catalog::result_tupdesc); without it (set-returning
    /// functions, whose fn_extra belongs to the SRF machinery), it is looked up by name.
    pub fn into_row(self, fcinfo: Option<pg_sys::FunctionCallInfo>) -> DecisionRow {
        let tupdesc = match fcinfo {
            // SAFETY: the call's own fcinfo, for a function returning quota.decision; the
            // descriptor lives in TopMemoryContext, so it is wrapped without reference counting.
            Some(fcinfo) => unsafe { PgTupleDesc::from_pg_unchecked(catalog::result_tupdesc(fcinfo)) },
            None => PgTupleDesc::for_composite_type_by_oid(catalog::quota_type(c"decision"))
                .unwrap_or_else(|| pgrx::error!("quota.decision is not a composite type")),
        };
        // A database still on a version before 0.8.0 (see catalog::Shape) has no
        // binding_subject column.
        let natts = tupdesc.len();
        let datums = [
            self.allowed.into_datum(),
            self.subject.into_datum(),
            self.metric.into_datum(),
            self.period.into_datum(),
            self.used.into_datum(),
            self.limit.into_datum(),
            self.remaining.into_datum(),
            self.reset_at.map(pg_sys::Datum::from),
            self.retry_after_seconds.into_datum(),
            self.replayed.into_datum(),
            self.binding_subject.into_datum(),
        ];
        let datums = datums.into_iter().take(natts);
        // SAFETY: the datums are in quota.decision's column order and of its column types.
        unsafe { PgHeapTuple::from_datums(tupdesc, datums) }
            .unwrap_or_else(|e| pgrx::error!("cannot form quota.decision: {e}"))
    }
}

/// Which window a multi-period answer describes: the one with the least remaining, and among
/// equals the one that resets last (a `total` window never does).
pub fn least_remaining(ws: &[Window]) -> &Window {
    ws.iter()
        .min_by_key(|w| (w.remaining(), std::cmp::Reverse(w.reset_at.unwrap_or(i64::MAX))))
        .expect("at least one window")
}

/// Of the windows that deny, the one that frees up last: waiting for it means all have reset.
pub fn latest_reset<'a>(ws: impl Iterator<Item = &'a Window>) -> &'a Window {
    ws.max_by_key(|w| w.reset_at.unwrap_or(i64::MAX))
        .expect("at least one window")
}

/// A timestamptz (microseconds since 2000-01-01 UTC) as PostgreSQL writes it in JSON, in UTC:
/// `2026-12-01T00:00:00+00:00`, `infinity`.
pub fn iso8601(micros: i64) -> String {
    let utc: std::ffi::c_int = 0;
    // SAFETY: JsonEncodeDateTime formats a timestamptz datum into a palloc'd NUL-terminated
    // string (no buffer given), at the offset given; it is copied and freed at once.
    unsafe {
        let p = pg_sys::JsonEncodeDateTime(
            std::ptr::null_mut(),
            pg_sys::Datum::from(micros),
            pg_sys::TIMESTAMPTZOID,
            &utc,
        );
        let s = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        pg_sys::pfree(p.cast());
        s
    }
}

/// (subjects, periods, window starts) of windows, as statement parameters.
pub(crate) fn window_args(ws: &[&Window]) -> (Vec<String>, Vec<String>, Vec<TimestampWithTimeZone>) {
    let subjects = ws.iter().map(|w| w.subject.clone()).collect();
    let periods = ws.iter().map(|w| w.period.clone()).collect();
    let starts = ws
        .iter()
        .map(|w| TimestampWithTimeZone::try_from(w.start).expect("window start read from PostgreSQL"))
        .collect();
    (subjects, periods, starts)
}
