//! Checking and charging the windows of one (subject, metric): the usage statements, the
//! plan's windows, a peek, a charge and its audit row.

use super::cache;
use super::decision::{latest_reset, least_remaining, Decision, Window};
use super::Request;
use crate::audit;
use crate::audit::refusal::{self, Refusal};
use crate::pg::error::{QuotaError, Result};
use crate::pg::guc;
use crate::pg::spi::{self, Stmt};
use crate::request::{self};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;
use serde_json::json;

/// Add `amount` to every window whose limit still has room. Rows are locked in the order given
/// (periods sorted), so concurrent callers cannot deadlock. Returns the windows incremented.
static UPSERT: Stmt = Stmt {
    sql: "
INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
SELECT $1, $2, t.period, t.window_start, $3
  FROM unnest($4::text[], $5::timestamptz[]) AS t(period, window_start)
    ON CONFLICT (subject, metric, period, window_start) DO UPDATE
   SET used = u.used + excluded.used
 WHERE u.used <= ($6::bigint[])[pg_catalog.array_position($4::text[], u.period)] - excluded.used
RETURNING u.period, u.used",
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::INT8OID,
        T::TEXTARRAYOID,
        T::TIMESTAMPTZARRAYOID,
        T::INT8ARRAYOID,
    ],
};

/// The single-row upsert: UPSERT for the common case of one period (a single-row statement is
/// cheaper to execute), also the first part of the statements that audit the grant.
macro_rules! upsert_one {
    () => {
        "
INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (subject, metric, period, window_start) DO UPDATE
   SET used = u.used + excluded.used
 WHERE u.used <= $6 - excluded.used
RETURNING u.period, u.used"
    };
}

/// The grant path in one statement: the single-row upsert and, when it granted, its audit row,
/// whose details are $7 with the new usage added. `$actor_column` and `$actor_value` name the
/// audit row's actor (none on the tables of a version before 0.6.0).
macro_rules! upsert_one_audited {
    ($actor_column:literal, $actor_value:literal) => {
        concat!(
            "WITH u AS (",
            upsert_one!(),
            "),
a AS (
    INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details, idempotency_key",
            $actor_column,
            ")
    SELECT $1, 'consume', $2, $5, true, 'granted', $7 || pg_catalog.jsonb_build_object('used', u.used), $8",
            $actor_value,
            "
      FROM u)
SELECT period, used FROM u"
        )
    };
}

static UPSERT_ONE: Stmt = Stmt {
    sql: upsert_one!(),
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::TEXTOID,
        T::TIMESTAMPTZOID,
        T::INT8OID,
        T::INT8OID,
    ],
};

static UPSERT_ONE_AUDITED: Stmt = Stmt {
    sql: upsert_one_audited!(", actor", ", $9"),
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::TEXTOID,
        T::TIMESTAMPTZOID,
        T::INT8OID,
        T::INT8OID,
        T::JSONBOID,
        T::TEXTOID,
        T::TEXTOID,
    ],
};

/// UPSERT_ONE_AUDITED on the tables of a version before 0.6.0 (see catalog::audit_has_actor).
static UPSERT_ONE_AUDITED_0_5: Stmt = Stmt {
    sql: upsert_one_audited!("", ""),
    args: UPSERT_ONE_AUDITED.args,
};

/// Take back an increment this call made (the rows are still locked by it) when another period
/// denied: all-or-nothing.
/// The parameters of a statement run by on_windows: subject, metric, amount, periods, window
/// starts.
pub(super) const ON_WINDOWS_ARGS: &[T] = &[
    T::TEXTOID,
    T::TEXTOID,
    T::INT8OID,
    T::TEXTARRAYOID,
    T::TIMESTAMPTZARRAYOID,
];

static UNDO: Stmt = Stmt {
    sql: "
UPDATE quota.usage AS u SET used = u.used - $3
  FROM unnest($4::text[], $5::timestamptz[]) AS t(period, window_start)
 WHERE u.subject = $1 AND u.metric = $2 AND u.period = t.period AND u.window_start = t.window_start",
    args: ON_WINDOWS_ARGS,
};

static READ: Stmt = Stmt {
    sql: "
SELECT t.period, coalesce(u.used, 0)
  FROM unnest($3::text[], $4::timestamptz[]) AS t(period, window_start)
  LEFT JOIN quota.usage AS u
    ON u.subject = $1 AND u.metric = $2 AND u.period = t.period AND u.window_start = t.window_start",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTARRAYOID, T::TIMESTAMPTZARRAYOID],
};

/// The plan that applies to a subject and metric, and the current window of each period it
/// limits.
pub(crate) struct PlanWindows {
    pub plan: String,
    pub windows: Vec<Window>,
}

pub(super) fn ts(row: &pgrx::spi::SpiHeapTupleData<'_>, n: usize) -> Option<i64> {
    spi::get::<TimestampWithTimeZone>(row, n).map(|t| t.into_inner())
}

pub(crate) fn load_limits(
    client: &mut SpiClient<'_>,
    subject: &str,
    metric: &str,
    claim: Option<&str>,
) -> Result<PlanWindows> {
    let cached = cache::limits(client, subject, metric, &guc::default_plan_str(), claim)?;
    let windows: Vec<Window> = cached
        .periods
        .iter()
        .map(|(period, limit)| {
            let (start, reset_at) = cache::window(client, period, &cached.time_zone);
            Window {
                period: period.clone(),
                limit: *limit,
                start,
                reset_at,
                used: 0,
            }
        })
        .collect();
    Ok(PlanWindows {
        plan: cached.plan.clone(),
        windows,
    })
}

pub(super) fn window_args(ws: &[&Window]) -> (Vec<String>, Vec<TimestampWithTimeZone>) {
    let periods = ws.iter().map(|w| w.period.clone()).collect();
    let starts = ws
        .iter()
        .map(|w| TimestampWithTimeZone::try_from(w.start).expect("window start read from PostgreSQL"))
        .collect();
    (periods, starts)
}

fn read_used(client: &mut SpiClient<'_>, subject: &str, metric: &str, ws: &mut [Window]) {
    let refs: Vec<&Window> = ws.iter().collect();
    let (periods, starts) = window_args(&refs);
    let rows = spi::run(
        client,
        &READ,
        &[subject.into(), metric.into(), periods.into(), starts.into()],
    );
    for row in rows {
        let p = spi::get::<String>(&row, 1).expect("period");
        let used = spi::get::<i64>(&row, 2).unwrap_or(0);
        if let Some(w) = ws.iter_mut().find(|w| w.period == p) {
            w.used = used;
        }
    }
}

pub(super) fn apply_returned(rows: pgrx::spi::SpiTupleTable<'_>, ws: &mut [Window]) -> Vec<String> {
    let mut touched = Vec::new();
    for row in rows {
        let p = spi::get::<String>(&row, 1).expect("period");
        let used = spi::get::<i64>(&row, 2).expect("used");
        if let Some(w) = ws.iter_mut().find(|w| w.period == p) {
            w.used = used;
        }
        touched.push(p);
    }
    touched
}

/// Audit details of a quota decision: the plan, and the binding window's period, usage and limit;
/// when several periods apply, every window too.
pub(super) fn details_json(plan: &str, binding: &Window, ws: &[Window]) -> serde_json::Value {
    let mut d = json!({
        "plan": plan,
        "period": binding.period,
        "used": binding.used,
        "limit": binding.limit,
    });
    if ws.len() > 1 {
        d["windows"] = ws
            .iter()
            .map(|w| json!({"period": w.period, "used": w.used, "limit": w.limit}))
            .collect();
    }
    d
}

/// What a consume or refund decided, why (the audit row's reason), and whether the statement
/// that granted wrote the audit row itself.
pub(super) struct Outcome {
    pub(super) decision: Decision,
    pub(super) reason: &'static str,
    pub(super) audited: bool,
}

/// A peek: no write, no audit row. Allowed when one more unit would fit everywhere.
pub(super) fn peek(client: &mut SpiClient<'_>, req: &Request<'_>, ws: &mut [Window]) -> Decision {
    read_used(client, req.subject, req.metric, ws);
    let full: Vec<&Window> = ws.iter().filter(|w| w.remaining() == 0).collect();
    if full.is_empty() {
        Decision::from_window(req.subject, req.metric, least_remaining(ws), true, false)
    } else {
        Decision::from_window(
            req.subject,
            req.metric,
            latest_reset(full.into_iter()),
            false,
            false,
        )
    }
}

/// A consume of at least one unit: every window incremented, or none.
pub(super) fn charge(
    client: &mut SpiClient<'_>,
    req: &Request<'_>,
    plan: &str,
    ws: &mut [Window],
) -> Result<Outcome> {
    let (subject, metric, amount) = (req.subject, req.metric, req.amount);
    if let Some(out) = never_fits(client, req, ws) {
        return Ok(out);
    }
    let (rows, audited) = increment(client, req, plan, ws);
    let granted = apply_returned(rows, ws);
    if granted.len() == ws.len() {
        return Ok(Outcome {
            decision: Decision::from_window(subject, metric, least_remaining(ws), true, false),
            reason: "granted",
            audited,
        });
    }
    // Some period denied: take back what the others were given (their rows are still locked by
    // this call), then answer with the windows that denied.
    if !granted.is_empty() {
        undo(client, req, ws, &granted);
    }
    read_used(client, subject, metric, ws);
    let denying: Vec<&Window> = ws.iter().filter(|w| !granted.contains(&w.period)).collect();
    if let Some(w) = denying.iter().find(|w| w.used > i64::MAX - amount) {
        return Err(QuotaError::UsageOverflow {
            metric: metric.into(),
            period: w.period.clone(),
            used: w.used,
            amount,
        });
    }
    Ok(Outcome {
        decision: Decision::from_window(subject, metric, latest_reset(denying.into_iter()), false, false),
        reason: "limit_reached",
        audited: false,
    })
}

/// The denial of an amount above one of the limits, which no window can ever grant, found
/// without touching usage.
fn never_fits(client: &mut SpiClient<'_>, req: &Request<'_>, ws: &mut [Window]) -> Option<Outcome> {
    let period = ws
        .iter()
        .filter(|w| req.amount > w.limit)
        .min_by_key(|w| w.limit)
        .map(|w| w.period.clone())?;
    read_used(client, req.subject, req.metric, ws);
    let w = ws
        .iter()
        .find(|x| x.period == period)
        .expect("the window just found");
    Some(Outcome {
        decision: Decision::from_window(req.subject, req.metric, w, false, true),
        reason: "exceeds_limit",
        audited: false,
    })
}

/// Take back what the `granted` periods were given when another period denied (their rows are
/// still locked by this call).
fn undo(client: &mut SpiClient<'_>, req: &Request<'_>, ws: &[Window], granted: &[String]) {
    let undo: Vec<&Window> = ws.iter().filter(|w| granted.contains(&w.period)).collect();
    on_windows(client, &UNDO, req, &undo);
}

/// Run a statement of parameters (subject, metric, amount, periods, window starts) on windows.
pub(super) fn on_windows<'conn>(
    client: &mut SpiClient<'conn>,
    stmt: &'static Stmt,
    req: &Request<'_>,
    ws: &[&Window],
) -> pgrx::spi::SpiTupleTable<'conn> {
    let (periods, starts) = window_args(ws);
    spi::run(
        client,
        stmt,
        &[
            req.subject.into(),
            req.metric.into(),
            req.amount.into(),
            periods.into(),
            starts.into(),
        ],
    )
}

/// The increment itself: the windows it granted, and whether the statement also wrote the grant's
/// audit row (the common case of one period, with auditing on, takes one statement).
fn increment<'conn>(
    client: &mut SpiClient<'conn>,
    req: &Request<'_>,
    plan: &str,
    ws: &[Window],
) -> (pgrx::spi::SpiTupleTable<'conn>, bool) {
    let (subject, metric, amount) = (req.subject, req.metric, req.amount);
    if let [w] = ws {
        let start = TimestampWithTimeZone::try_from(w.start).expect("window start");
        let mut args = vec![
            subject.into(),
            metric.into(),
            w.period.as_str().into(),
            start.into(),
            amount.into(),
            w.limit.into(),
        ];
        if !guc::audit_wanted(true) {
            return (spi::run(client, &UPSERT_ONE, &args), false);
        }
        // The details but for `used`, which the statement adds.
        args.push(pgrx::JsonB(json!({"plan": plan, "period": w.period, "limit": w.limit})).into());
        args.push(req.key.into());
        args.push(request::actor().into());
        let stmt = if crate::pg::catalog::audit_has_actor() {
            &UPSERT_ONE_AUDITED
        } else {
            &UPSERT_ONE_AUDITED_0_5
        };
        return (spi::run(client, stmt, &args), true);
    }
    let refs: Vec<&Window> = ws.iter().collect();
    let (periods, starts) = window_args(&refs);
    let limits: Vec<i64> = ws.iter().map(|w| w.limit).collect();
    let rows = spi::run(
        client,
        &UPSERT,
        &[
            subject.into(),
            metric.into(),
            amount.into(),
            periods.into(),
            starts.into(),
            limits.into(),
        ],
    );
    (rows, false)
}

/// The decision's audit row: in the caller's transaction, or, for a denial that require is
/// about to raise, through the audit writer.
pub(super) fn audit_decision(
    client: &mut SpiClient<'_>,
    req: &Request<'_>,
    plan: &str,
    ws: &[Window],
    decision: &Decision,
    reason: &'static str,
) {
    let binding = ws
        .iter()
        .find(|w| Some(&w.period) == decision.period.as_ref())
        .unwrap_or(&ws[0]);
    let details = details_json(plan, binding, ws);
    if req.queue_denial && !decision.allowed {
        refusal::refusal(Refusal {
            subject: Some(req.subject),
            action: req.action.name(),
            metric: Some(req.metric),
            amount: Some(req.amount),
            reason,
            details,
            idempotency_key: req.key,
        });
    } else {
        audit::record(
            client,
            audit::Entry {
                subject: Some(req.subject),
                action: req.action.name(),
                metric: Some(req.metric),
                amount: Some(req.amount),
                success: decision.allowed,
                reason,
                details,
                idempotency_key: req.key,
            },
        );
    }
}
