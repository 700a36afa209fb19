//! Checking and charging the windows of one (subject, metric), and of its ancestors that limit
//! the metric (pooled quotas): the usage statements, the windows, a peek, a charge and its
//! audit row.

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

/// Add `amount` to every window whose limit still has room; the windows may belong to several
/// subjects (a chain). Rows are locked in the order given, sorted by subject and period
/// (window_order), the one order every caller uses, whatever its chain: concurrent callers
/// cannot deadlock. A window's limit is found by its key `<period>:<subject>` (a period has no
/// colon, so the key is unambiguous). Returns the windows incremented.
static UPSERT: Stmt = Stmt {
    sql: "
INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
SELECT t.subject, $2, t.period, t.window_start, $3
  FROM unnest($1::text[], $4::text[], $5::timestamptz[]) AS t(subject, period, window_start)
    ON CONFLICT (subject, metric, period, window_start) DO UPDATE
   SET used = u.used + excluded.used
 WHERE u.used <= ($6::bigint[])[pg_catalog.array_position($7::text[], u.period || ':' || u.subject)] - excluded.used
RETURNING u.subject, u.period, u.used",
    args: &[
        T::TEXTARRAYOID,
        T::TEXTOID,
        T::INT8OID,
        T::TEXTARRAYOID,
        T::TIMESTAMPTZARRAYOID,
        T::INT8ARRAYOID,
        T::TEXTARRAYOID,
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
RETURNING u.subject, u.period, u.used"
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
SELECT subject, period, used FROM u"
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

/// The parameters of a statement run by on_windows, once per subject: subject, metric, amount,
/// periods, window starts. One subject per statement, not arrays of subjects: a join on the
/// subject from an array gets a generic plan the plan cache never prefers, so every execution
/// would be planned anew (seen: a trusted refund cost 30 times its 0.7.0 instructions).
pub(super) const ON_WINDOWS_ARGS: &[T] = &[
    T::TEXTOID,
    T::TEXTOID,
    T::INT8OID,
    T::TEXTARRAYOID,
    T::TIMESTAMPTZARRAYOID,
];

/// Take back an increment this call made (the rows are still locked by it) when another window
/// denied: all-or-nothing.
static UNDO: Stmt = Stmt {
    sql: "
UPDATE quota.usage AS u SET used = u.used - $3
  FROM unnest($4::text[], $5::timestamptz[]) AS t(period, window_start)
 WHERE u.subject = $1 AND u.metric = $2 AND u.period = t.period AND u.window_start = t.window_start",
    args: ON_WINDOWS_ARGS,
};

/// The usage of one subject's windows; the same parameters ($3 unused).
static READ: Stmt = Stmt {
    sql: "
SELECT t.period, coalesce(u.used, 0)
  FROM unnest($4::text[], $5::timestamptz[]) AS t(period, window_start)
  LEFT JOIN quota.usage AS u
    ON u.subject = $1 AND u.metric = $2 AND u.period = t.period AND u.window_start = t.window_start",
    args: ON_WINDOWS_ARGS,
};

/// The plan that applies to a subject and metric, the plan of each level of its chain that
/// limits the metric, and the current window of each period each level limits, in lock order.
pub(crate) struct PlanWindows {
    /// The subject's own plan.
    pub plan: String,
    /// (subject, plan) of each level that limits the metric, nearest first.
    pub levels: Vec<(String, String)>,
    pub windows: Vec<Window>,
}

pub(super) fn ts(row: &pgrx::spi::SpiHeapTupleData<'_>, n: usize) -> Option<i64> {
    spi::get::<TimestampWithTimeZone>(row, n).map(|t| t.into_inner())
}

/// The one order in which every caller locks usage rows: by subject, then period.
pub(super) fn window_order(ws: &mut [Window]) {
    ws.sort_by(|a, b| {
        (a.subject.as_bytes(), super::period::rank(&a.period))
            .cmp(&(b.subject.as_bytes(), super::period::rank(&b.period)))
    });
}

pub(crate) fn load_limits(client: &mut SpiClient<'_>, req: &Request<'_>) -> Result<PlanWindows> {
    let (plan, levels) = super::chain::levels(client, req.subject, req.metric, req.claim, req.parent_claim)?;
    let mut windows: Vec<Window> = Vec::with_capacity(levels.iter().map(|l| l.limits.periods.len()).sum());
    for level in &levels {
        for (period, limit) in &level.limits.periods {
            let (start, reset_at) = cache::window(client, period, &level.limits.time_zone);
            windows.push(Window {
                subject: level.subject.clone(),
                period: period.clone(),
                limit: *limit,
                start,
                reset_at,
                used: 0,
            });
        }
    }
    if levels.len() > 1 {
        window_order(&mut windows);
    }
    Ok(PlanWindows {
        plan,
        levels: levels.into_iter().map(|l| (l.subject, l.limits.plan)).collect(),
        windows,
    })
}

/// (subjects, periods, window starts) of windows, as statement parameters.
pub(super) fn window_args(ws: &[&Window]) -> (Vec<String>, Vec<String>, Vec<TimestampWithTimeZone>) {
    let subjects = ws.iter().map(|w| w.subject.clone()).collect();
    let periods = ws.iter().map(|w| w.period.clone()).collect();
    let starts = ws
        .iter()
        .map(|w| TimestampWithTimeZone::try_from(w.start).expect("window start read from PostgreSQL"))
        .collect();
    (subjects, periods, starts)
}

/// A usage row a statement returned: subject, period, used.
pub(super) type Returned = (String, String, i64);

/// The rows of a statement returning (subject, period, used).
fn returned(rows: pgrx::spi::SpiTupleTable<'_>) -> Vec<Returned> {
    rows.map(|row| {
        (
            spi::get::<String>(&row, 1).expect("subject"),
            spi::get::<String>(&row, 2).expect("period"),
            spi::get::<i64>(&row, 3).expect("used"),
        )
    })
    .collect()
}

fn read_used(client: &mut SpiClient<'_>, req: &Request<'_>, ws: &mut [Window]) {
    let refs: Vec<&Window> = ws.iter().collect();
    let rows = on_windows(client, &READ, req, &refs);
    apply_returned(rows, ws);
}

/// Note the usage of the windows a statement returned; returns their (subject, period).
pub(super) fn apply_returned(rows: Vec<Returned>, ws: &mut [Window]) -> Vec<(String, String)> {
    let mut touched = Vec::with_capacity(rows.len());
    for (s, p, used) in rows {
        if let Some(w) = ws.iter_mut().find(|w| w.period == p && w.subject == s) {
            w.used = used;
        }
        touched.push((s, p));
    }
    touched
}

fn is_in(w: &Window, touched: &[(String, String)]) -> bool {
    touched.iter().any(|(s, p)| *s == w.subject && *p == w.period)
}

/// Audit details of a quota decision: the plan, and the binding window's period, usage and limit;
/// when several periods apply, every window too. When the windows belong to a chain (pooled
/// quotas): also the binding subject, and each level's subject, plan and windows.
pub(super) fn details_json(
    subject: &str,
    plan: &str,
    levels: &[(String, String)],
    binding: &Window,
    ws: &[Window],
) -> serde_json::Value {
    let mut d = json!({
        "plan": plan,
        "period": binding.period,
        "used": binding.used,
        "limit": binding.limit,
    });
    let pooled = levels.len() > 1 || levels.iter().any(|(s, _)| s != subject);
    if pooled {
        d["binding_subject"] = json!(binding.subject);
        d["chain"] = levels
            .iter()
            .map(|(subject, plan)| {
                json!({
                    "subject": subject,
                    "plan": plan,
                    "windows": ws.iter().filter(|w| w.subject == *subject)
                        .map(|w| json!({"period": w.period, "used": w.used, "limit": w.limit}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
    } else if ws.len() > 1 {
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
    read_used(client, req, ws);
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

/// A consume of at least one unit: every window of every level incremented, or none.
pub(super) fn charge(client: &mut SpiClient<'_>, req: &Request<'_>, pw: &mut PlanWindows) -> Result<Outcome> {
    let (subject, metric, amount) = (req.subject, req.metric, req.amount);
    let ws = &mut pw.windows;
    if let Some(out) = never_fits(client, req, ws) {
        return Ok(out);
    }
    let (rows, audited) = increment(client, req, &pw.plan, ws);
    let granted = apply_returned(returned(rows), ws);
    if granted.len() == ws.len() {
        return Ok(Outcome {
            decision: Decision::from_window(subject, metric, least_remaining(ws), true, false),
            reason: "granted",
            audited,
        });
    }
    // Some window denied: take back what the others were given (their rows are still locked by
    // this call), then answer with the windows that denied.
    if !granted.is_empty() {
        let undo: Vec<&Window> = ws.iter().filter(|w| is_in(w, &granted)).collect();
        on_windows(client, &UNDO, req, &undo);
    }
    read_used(client, req, ws);
    let denying: Vec<&Window> = ws.iter().filter(|w| !is_in(w, &granted)).collect();
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
    let at = ws
        .iter()
        .enumerate()
        .filter(|(_, w)| req.amount > w.limit)
        .min_by_key(|(_, w)| w.limit)
        .map(|(i, _)| i)?;
    read_used(client, req, ws);
    Some(Outcome {
        decision: Decision::from_window(req.subject, req.metric, &ws[at], false, true),
        reason: "exceeds_limit",
        audited: false,
    })
}

/// Run a statement of parameters (subject, metric, amount, periods, window starts) on windows,
/// once per subject, in the windows' order (lock order: they are sorted by subject, then
/// period), and collect what it returns, (period, used) of each row, if anything.
pub(super) fn on_windows(
    client: &mut SpiClient<'_>,
    stmt: &'static Stmt,
    req: &Request<'_>,
    ws: &[&Window],
) -> Vec<Returned> {
    let mut out = Vec::with_capacity(ws.len());
    let mut rest = ws;
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|w| w.subject == first.subject).count();
        let (group, tail) = rest.split_at(n);
        rest = tail;
        let (_, periods, starts) = window_args(group);
        let rows = spi::run(
            client,
            stmt,
            &[
                first.subject.as_str().into(),
                req.metric.into(),
                req.amount.into(),
                periods.into(),
                starts.into(),
            ],
        );
        for row in rows {
            if let (Some(p), Some(used)) = (spi::get::<String>(&row, 1), spi::get::<i64>(&row, 2)) {
                out.push((first.subject.clone(), p, used));
            }
        }
    }
    out
}

/// The increment itself: the windows it granted, and whether the statement also wrote the grant's
/// audit row (the common case of one window of the subject's own, with auditing on, takes one
/// statement).
fn increment<'conn>(
    client: &mut SpiClient<'conn>,
    req: &Request<'_>,
    plan: &str,
    ws: &[Window],
) -> (pgrx::spi::SpiTupleTable<'conn>, bool) {
    let (metric, amount) = (req.metric, req.amount);
    if let [w] = ws {
        let start = TimestampWithTimeZone::try_from(w.start).expect("window start");
        let mut args = vec![
            w.subject.as_str().into(),
            metric.into(),
            w.period.as_str().into(),
            start.into(),
            amount.into(),
            w.limit.into(),
        ];
        if !guc::audit_wanted(true) || w.subject != req.subject {
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
    let (subjects, periods, starts) = window_args(&refs);
    let limits: Vec<i64> = ws.iter().map(|w| w.limit).collect();
    let keys: Vec<String> = ws.iter().map(|w| format!("{}:{}", w.period, w.subject)).collect();
    let rows = spi::run(
        client,
        &UPSERT,
        &[
            subjects.into(),
            metric.into(),
            amount.into(),
            periods.into(),
            starts.into(),
            limits.into(),
            keys.into(),
        ],
    );
    (rows, false)
}

/// The decision's audit row: in the caller's transaction, or, for a denial that require is
/// about to raise, through the audit writer.
pub(super) fn audit_decision(
    client: &mut SpiClient<'_>,
    req: &Request<'_>,
    pw: &PlanWindows,
    decision: &Decision,
    reason: &'static str,
) {
    let ws = &pw.windows;
    let binding = ws
        .iter()
        .find(|w| {
            Some(&w.period) == decision.period.as_ref()
                && Some(&w.subject) == decision.binding_subject.as_ref()
        })
        .unwrap_or(&ws[0]);
    let details = details_json(req.subject, &pw.plan, &pw.levels, binding, ws);
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
