//! The SQL side of hot windows (see hot.rs): turning a window hot, writing a hot grant to the
//! backend's row of quota.usage_stripes, and giving usage back to a window whose usage may sit
//! in its stripes.

use super::decision::{window_args, Window};
use super::hot;
use super::Request;
use crate::pg::spi::{self, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;

/// The sum of the stripes of one window, named by four SQL expressions (subject, metric,
/// period, window start): a scalar subquery, found by the first four columns of the key.
macro_rules! stripes_sum {
    ($subject:literal, $metric:literal, $period:literal, $start:literal) => {
        concat!(
            "(SELECT coalesce(pg_catalog.sum(ust.used), 0)::bigint FROM quota.usage_stripes AS ust
               WHERE ust.subject = ",
            $subject,
            " AND ust.metric = ",
            $metric,
            " AND ust.period = ",
            $period,
            " AND ust.window_start = ",
            $start,
            ")"
        )
    };
}
pub(super) use stripes_sum;

/// The sum of a window's stripes, for the window of the usage row `u`.
macro_rules! stripes_of_u {
    () => {
        $crate::quota::stripes::stripes_sum!("u.subject", "u.metric", "u.period", "u.window_start")
    };
}
pub(super) use stripes_of_u;

/// Lock the window's usage row (a lock only: no new row version, which would make other
/// writers' unique checks wait); waits for the cold grants in flight. No row: the window stays
/// cold until a cold grant has created it (every hot window has a usage row, which near_limit,
/// prune and quota.usage_totals go by).
static LOAD_LOCK: Stmt = Stmt {
    sql: "SELECT u.xmin::text::bigint FROM quota.usage AS u
           WHERE u.subject = $1 AND u.metric = $2 AND u.period = $3 AND u.window_start = $4
             FOR UPDATE",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID, T::TIMESTAMPTZOID],
};

/// The window's usage, in a snapshot taken after LOAD_LOCK: every grant so far; and who wrote
/// its rows (the usage row's xmin, then its stripes'), see `written_here`.
static LOAD_READ: Stmt = Stmt {
    sql: concat!(
        "SELECT u.used + ",
        stripes_of_u!(),
        ", u.xmin::text::bigint,
                (SELECT pg_catalog.array_agg(ust.xmin::text::bigint) FROM quota.usage_stripes AS ust
                  WHERE ust.subject = u.subject AND ust.metric = u.metric AND ust.period = u.period
                    AND ust.window_start = u.window_start)
           FROM quota.usage AS u
          WHERE u.subject = $1 AND u.metric = $2 AND u.period = $3 AND u.window_start = $4"
    ),
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID, T::TIMESTAMPTZOID],
};

fn start_arg(w: &Window) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(w.start).expect("window start read from PostgreSQL")
}

/// Run `f` in a subtransaction that is rolled back afterwards (as PL/pgSQL runs a block with an
/// exception handler), also when `f` raises, before the error goes on: what `f` locked is
/// released at once.
fn in_rolled_back_subtransaction<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the sequence PL/pgSQL's exec_stmt_block uses: begin, run in the caller's memory
    // context, roll back and restore the caller's memory context and resource owner, on
    // success and on error alike.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        let restore = move || {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        };
        let f = std::panic::AssertUnwindSafe(f);
        let out = PgTryBuilder::new(move || ({ f }.0)())
            .catch_others(|e| {
                restore();
                e.rethrow()
            })
            .execute();
        restore();
        out
    }
}

/// Whether this transaction (or one of its subtransactions) wrote one of the rows whose xmins
/// are given: what the loader read would then count changes that a rollback takes back (a
/// refund, a reset, a cold grant of this very transaction), and the slot would keep them. Such
/// a window turns hot from another transaction instead.
fn written_here(xmins: &[i64]) -> bool {
    xmins.iter().any(|&x| {
        // SAFETY: looks the id up among this backend's own (sub)transaction ids.
        unsafe { pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from_inner(x as u32)) }
    })
}

/// Turn the window hot (hot.rs, "Turning hot"), in a subtransaction rolled back at once, which
/// releases the usage row's lock: the loader holds it only while it reads, never while it
/// waits for anything else. Only at READ COMMITTED (each statement a new snapshot, and the lock
/// taken on the newest row version without a serialization failure).
pub(super) fn load(client: &mut SpiClient<'_>, metric: &str, w: &Window, k: hot::Key) {
    // SAFETY: a backend global.
    if unsafe { pg_sys::XactIsoLevel } != pg_sys::XACT_READ_COMMITTED as i32 {
        return;
    }
    let hot::Claim::Claimed(slot) = hot::claim(k, w.reset_at) else {
        return;
    };
    let args = [
        w.subject.as_str().into(),
        metric.into(),
        w.period.as_str().into(),
        start_arg(w).into(),
    ];
    // The slot is LOADING until activated under the lock, or abandoned: when the window has no
    // usage row yet, or the lock or the read raises (a statement timeout, a cancel).
    let client = std::panic::AssertUnwindSafe(client);
    let loaded = PgTryBuilder::new(move || {
        // The whole wrapper moves in (a closure would capture only its field otherwise).
        let client = { client }.0;
        in_rolled_back_subtransaction(|| {
            if spi::run(client, &LOAD_LOCK, &args).len() == 0 {
                return false;
            }
            let (used, writers) = spi::run(client, &LOAD_READ, &args)
                .next()
                .map(|r| {
                    let mut writers = spi::get::<Vec<i64>>(&r, 3).unwrap_or_default();
                    writers.extend(spi::get::<i64>(&r, 2));
                    (
                        spi::get::<i64>(&r, 1).expect("the usage row just locked"),
                        writers,
                    )
                })
                .expect("the usage row just locked");
            if written_here(&writers) {
                return false;
            }
            hot::activate(slot, used);
            true
        })
    })
    .catch_others(|e| {
        hot::abandon(slot);
        e.rethrow()
    })
    .execute();
    if !loaded {
        hot::abandon(slot);
    }
}

/// A hot grant of one window of the caller's own, with its audit row: the stripe row and the
/// audit row in one statement. `$7` is the audit row's details. (The window has a usage row:
/// see LOAD_LOCK.)
static STRIPE_ONE_AUDITED: Stmt = Stmt {
    sql: "
WITH s AS (
    INSERT INTO quota.usage_stripes AS s (subject, metric, period, window_start, stripe, used)
    VALUES ($1, $2, $3, $4, $6, $5)
        ON CONFLICT (subject, metric, period, window_start, stripe) DO UPDATE
       SET used = s.used + excluded.used
    RETURNING 1)
INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details, idempotency_key, actor)
SELECT $1, 'consume', $2, $5, true, 'granted', $7, $8, $9 FROM s",
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::TEXTOID,
        T::TIMESTAMPTZOID,
        T::INT8OID,
        T::INT4OID,
        T::JSONBOID,
        T::TEXTOID,
        T::TEXTOID,
    ],
};

/// Hot grants (or, negative, refunds) of one subject's windows: subject, metric, amount,
/// periods, window starts, stripe.
static STRIPES: Stmt = Stmt {
    sql: "
INSERT INTO quota.usage_stripes AS s (subject, metric, period, window_start, stripe, used)
SELECT $1, $2, t.period, t.window_start, $6, $3
  FROM unnest($4::text[], $5::timestamptz[]) AS t(period, window_start)
    ON CONFLICT (subject, metric, period, window_start, stripe) DO UPDATE
   SET used = s.used + excluded.used",
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::INT8OID,
        T::TEXTARRAYOID,
        T::TIMESTAMPTZARRAYOID,
        T::INT4OID,
    ],
};

/// Write `amount` to this backend's stripes of windows (in lock order: they are sorted by
/// subject, then period), one statement per subject.
pub(super) fn write(client: &mut SpiClient<'_>, metric: &str, amount: i64, ws: &[&Window]) {
    let mut rest = ws;
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|w| w.subject == first.subject).count();
        let (group, tail) = rest.split_at(n);
        rest = tail;
        let (_, periods, starts) = window_args(group);
        spi::run(
            client,
            &STRIPES,
            &[
                first.subject.as_str().into(),
                metric.into(),
                amount.into(),
                periods.into(),
                starts.into(),
                hot::stripe().into(),
            ],
        );
    }
}

/// The hot grant of one window of the caller's own, and its audit row with `details`.
pub(super) fn write_one_audited(
    client: &mut SpiClient<'_>,
    req: &Request<'_>,
    w: &Window,
    details: serde_json::Value,
) {
    spi::run(
        client,
        &STRIPE_ONE_AUDITED,
        &[
            w.subject.as_str().into(),
            req.metric.into(),
            w.period.as_str().into(),
            start_arg(w).into(),
            req.amount.into(),
            hot::stripe().into(),
            pgrx::JsonB(details).into(),
            req.key.into(),
            crate::request::actor().into(),
        ],
    );
}

/// A window's usage row, locked (refunds of one window queue on it, and see each other), with
/// its stripes.
static REFUND_READ: Stmt = Stmt {
    sql: concat!(
        "SELECT u.used, ",
        stripes_of_u!(),
        " FROM quota.usage AS u
          WHERE u.subject = $1 AND u.metric = $2 AND u.period = $3 AND u.window_start = $4
            FOR UPDATE OF u"
    ),
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID, T::TIMESTAMPTZOID],
};

static REFUND_ROW: Stmt = Stmt {
    sql: "UPDATE quota.usage AS u SET used = u.used - $5
           WHERE u.subject = $1 AND u.metric = $2 AND u.period = $3 AND u.window_start = $4",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID, T::TIMESTAMPTZOID, T::INT8OID],
};

/// Give `amount` back to one window, never below zero: from its usage row first, the rest from
/// this backend's stripe (a window's usage may sit in its stripes). The usage row stays at 0 or
/// above, so that a cold grant's check (the row plus the stripes) never refuses wrongly. The
/// stripes read may miss a grant committed while the lock was awaited, which can only make the
/// refund smaller. Returns the window's usage after, None when it has no usage row.
pub(super) fn refund_window(
    client: &mut SpiClient<'_>,
    metric: &str,
    amount: i64,
    w: &Window,
) -> Option<i64> {
    let key = [
        w.subject.as_str().into(),
        metric.into(),
        w.period.as_str().into(),
        start_arg(w).into(),
    ];
    let (row, stripes) = spi::run(client, &REFUND_READ, &key).next().map(|r| {
        (
            spi::get::<i64>(&r, 1).unwrap_or(0),
            spi::get::<i64>(&r, 2).unwrap_or(0),
        )
    })?;
    let total = row.saturating_add(stripes);
    let x = amount.min(total.max(0));
    let from_row = x.min(row.max(0));
    let from_stripe = x - from_row;
    if from_row > 0 {
        let [a, b, c, d] = key;
        spi::run(client, &REFUND_ROW, &[a, b, c, d, from_row.into()]);
    }
    if from_stripe > 0 {
        write(client, metric, -from_stripe, &[w]);
    }
    if let Some(k) = hot::key(&w.subject, metric, &w.period, w.start) {
        hot::decrease_at_commit(k, x);
    }
    Some(total - x)
}
