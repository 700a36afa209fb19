//! Durable quotas: check-and-increment per subject, metric and calendar window, all periods of a
//! metric at once, exact under any concurrency, committed or rolled back with the caller.
//!
//! Exactness comes from the row lock of `INSERT ... ON CONFLICT DO UPDATE ... WHERE`: at READ
//! COMMITTED a session that waited for the row re-checks the limit against the row's newest
//! version, so the sum granted never passes the limit.

pub mod cache;
pub mod decision;
pub mod period;

use crate::audit;
use crate::audit::queue;

use crate::metrics::{self, Counter};
use crate::pg::error::{OrRaise, QuotaError, Result};
use crate::pg::guc;
use crate::pg::spi::{self, Stmt};
use crate::request::{self, AsOwner};
use decision::{latest_reset, least_remaining, Decision, DecisionRow, Window};
use period::check_period;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;
use serde_json::json;

fn check_metric(metric: Option<&str>) -> Result<&str> {
    request::check_name(
        "metric",
        metric,
        "Pass the name of the metric to count, e.g. 'api_calls'.",
    )
}

fn check_amount(amount: Option<i64>) -> Result<i64> {
    let a = amount.ok_or(QuotaError::NullArgument {
        what: "amount",
        hint: "Pass 1 to count one unit, 0 to peek.",
    })?;
    if a < 0 {
        return Err(QuotaError::Negative {
            what: "amount",
            value: a,
        });
    }
    Ok(a)
}

fn check_idempotency_key(key: Option<&str>) -> Result<Option<String>> {
    match key {
        None => Ok(None),
        Some(k) => {
            request::check_present("idempotency_key", k)?;
            Ok(Some(k.to_string()))
        }
    }
}

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

/// The same for the common case of one period: a single-row statement is cheaper to execute.
static UPSERT_ONE: Stmt = Stmt {
    sql: "
INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (subject, metric, period, window_start) DO UPDATE
   SET used = u.used + excluded.used
 WHERE u.used <= $6 - excluded.used
RETURNING u.period, u.used",
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::TEXTOID,
        T::TIMESTAMPTZOID,
        T::INT8OID,
        T::INT8OID,
    ],
};

/// The grant path in one statement: the single-row upsert and, when it granted, its audit row.
static UPSERT_ONE_AUDITED: Stmt = Stmt {
    sql: "
WITH u AS (
    INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
    VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (subject, metric, period, window_start) DO UPDATE
       SET used = u.used + excluded.used
     WHERE u.used <= $6 - excluded.used
    RETURNING u.period, u.used),
a AS (
    INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details, idempotency_key, actor)
    SELECT $1, 'consume', $2, $5, true, 'granted',
           ($7 || u.used::text || '}')::jsonb,
           $8, $9
      FROM u)
SELECT period, used FROM u",
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::TEXTOID,
        T::TIMESTAMPTZOID,
        T::INT8OID,
        T::INT8OID,
        T::TEXTOID,
        T::TEXTOID,
        T::TEXTOID,
    ],
};

/// UPSERT_ONE_AUDITED on the tables of a version before 0.6.0 (see catalog::audit_has_actor).
static UPSERT_ONE_AUDITED_0_5: Stmt = Stmt {
    sql: "
WITH u AS (
    INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
    VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (subject, metric, period, window_start) DO UPDATE
       SET used = u.used + excluded.used
     WHERE u.used <= $6 - excluded.used
    RETURNING u.period, u.used),
a AS (
    INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details, idempotency_key)
    SELECT $1, 'consume', $2, $5, true, 'granted',
           ($7 || u.used::text || '}')::jsonb,
           $8
      FROM u)
SELECT period, used FROM u",
    args: UPSERT_ONE_AUDITED.args,
};

/// Take back an increment this call made (the rows are still locked by it) when another period
/// denied: all-or-nothing.
static UNDO: Stmt = Stmt {
    sql: "
UPDATE quota.usage AS u SET used = u.used - $3
  FROM unnest($4::text[], $5::timestamptz[]) AS t(period, window_start)
 WHERE u.subject = $1 AND u.metric = $2 AND u.period = t.period AND u.window_start = t.window_start",
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::INT8OID,
        T::TEXTARRAYOID,
        T::TIMESTAMPTZARRAYOID,
    ],
};

static READ: Stmt = Stmt {
    sql: "
SELECT t.period, coalesce(u.used, 0)
  FROM unnest($3::text[], $4::timestamptz[]) AS t(period, window_start)
  LEFT JOIN quota.usage AS u
    ON u.subject = $1 AND u.metric = $2 AND u.period = t.period AND u.window_start = t.window_start",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTARRAYOID, T::TIMESTAMPTZARRAYOID],
};

static REFUND: Stmt = Stmt {
    sql: "
UPDATE quota.usage AS u SET used = greatest(u.used - $3, 0)
  FROM unnest($4::text[], $5::timestamptz[]) AS t(period, window_start)
 WHERE u.subject = $1 AND u.metric = $2 AND u.period = t.period AND u.window_start = t.window_start
RETURNING u.period, u.used",
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::INT8OID,
        T::TEXTARRAYOID,
        T::TIMESTAMPTZARRAYOID,
    ],
};

/// Claim an idempotency key. A concurrent holder of the same key makes this wait until it
/// commits (then the key is taken) or rolls back (then it is ours).
static KEY_CLAIM: Stmt = Stmt {
    sql: "INSERT INTO quota.idempotency_keys (subject, key) VALUES ($1, $2)
          ON CONFLICT (subject, key) DO NOTHING RETURNING true",
    args: &[T::TEXTOID, T::TEXTOID],
};

static KEY_GET: Stmt = Stmt {
    sql: "
SELECT k.response -> 'request', d.allowed AND NOT k.response ? 'refund', d.subject, d.metric,
       d.period, d.used, d.quota_limit, d.remaining, d.reset_at, d.retry_after_seconds
  FROM quota.idempotency_keys AS k,
       LATERAL pg_catalog.jsonb_populate_record(NULL::quota.decision, k.response -> 'decision') AS d
 WHERE k.subject = $1 AND k.key = $2",
    args: &[T::TEXTOID, T::TEXTOID],
};

static KEY_SET: Stmt = Stmt {
    sql: "UPDATE quota.idempotency_keys SET response = $3 WHERE subject = $1 AND key = $2",
    args: &[T::TEXTOID, T::TEXTOID, T::JSONBOID],
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    Consume,
    Refund,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Consume => "consume",
            Action::Refund => "refund",
        }
    }
}

/// The plan that applies to a subject and metric, and the current window of each period it
/// limits.
pub(crate) struct PlanWindows {
    pub plan: String,
    pub windows: Vec<Window>,
}

fn ts(row: &pgrx::spi::SpiHeapTupleData<'_>, n: usize) -> Option<i64> {
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

fn window_args(ws: &[&Window]) -> (Vec<String>, Vec<TimestampWithTimeZone>) {
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

fn apply_returned(rows: pgrx::spi::SpiTupleTable<'_>, ws: &mut [Window]) -> Vec<String> {
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
fn details_json(plan: &str, binding: &Window, ws: &[Window]) -> serde_json::Value {
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

struct Request<'a> {
    action: Action,
    subject: &'a str,
    metric: &'a str,
    amount: i64,
    key: Option<&'a str>,
    /// The caller is trusted (may refund anything).
    trusted: bool,
    /// The plan the caller's JWT claims (app_metadata.plan), when it acts as its own subject.
    claim: Option<&'a str>,
    /// A denial is about to be raised (require): its audit row goes to the audit writer, as the
    /// raise will roll back the caller's transaction.
    queue_denial: bool,
}

impl Request<'_> {
    fn json(&self) -> serde_json::Value {
        json!({"action": self.action.name(), "metric": self.metric, "amount": self.amount})
    }
}

/// Replay of an idempotency key: the first decision, or 22023 when the key was used for
/// something else. A grant that was refunded since no longer stands: its replay is not
/// allowed (so a key a subject claimed and refunded first cannot hand a service that uses the
/// same key later a grant that charged nothing).
fn replay(client: &mut SpiClient<'_>, req: &Request<'_>, key: &str) -> Result<Decision> {
    let rows = spi::run(client, &KEY_GET, &[req.subject.into(), key.into()]);
    let row = rows
        .into_iter()
        .next()
        .expect("the key row exists: the claim conflicted with it");
    let first: pgrx::JsonB = spi::get::<pgrx::JsonB>(&row, 1)
        .unwrap_or_else(|| pgrx::error!("idempotency key \"{key}\" has no stored response"));
    let now = req.json();
    if first.0 != now {
        return Err(QuotaError::IdempotencyMismatch {
            key: key.to_string(),
            first: first.0.to_string(),
            now: now.to_string(),
        });
    }
    Ok(Decision {
        allowed: spi::get::<bool>(&row, 2).unwrap_or(false),
        subject: spi::get::<String>(&row, 3).unwrap_or_default(),
        metric: spi::get::<String>(&row, 4).unwrap_or_default(),
        period: spi::get::<String>(&row, 5),
        used: spi::get::<i64>(&row, 6).unwrap_or(0),
        limit: spi::get::<i64>(&row, 7).unwrap_or(0),
        remaining: spi::get::<i64>(&row, 8).unwrap_or(0),
        reset_at: ts(&row, 9),
        retry_after_seconds: spi::get::<i32>(&row, 10),
        replayed: true,
    })
}

static GRANT_LOCK: Stmt = Stmt {
    sql: "SELECT response FROM quota.idempotency_keys WHERE subject = $1 AND key = $2 FOR UPDATE",
    args: &[T::TEXTOID, T::TEXTOID],
};

/// An untrusted caller's refund: only of a grant it received, named by that consume's
/// idempotency key, at most the grant's amount, once (a repeat with the same amount replays the
/// first refund). It gives back to the windows the grant charged, not to the current ones (a
/// grant of yesterday refunded today would otherwise free today's window). The key's row is
/// locked, so two refunds of one grant queue and the second sees the first. Anything else is
/// 42501 and changes nothing (the refusal is audited by the caller's transaction, which the
/// error rolls back, so it goes to the audit writer).
fn refund_grant(client: &mut SpiClient<'_>, req: &Request<'_>) -> Result<Decision> {
    let refused = |why: &'static str| {
        queue::refusal(queue::Refusal {
            subject: Some(req.subject),
            action: "refund",
            metric: Some(req.metric),
            amount: Some(req.amount),
            reason: "not_a_grant",
            details: json!({"why": why}),
            idempotency_key: req.key,
        });
        QuotaError::RefundNotAGrant { why }
    };
    if !guc::UNTRUSTED_REFUNDS.get() {
        return Err(refused(
            "quota_ext.untrusted_refunds is off: only trusted roles refund",
        ));
    }
    let Some(key) = req.key else {
        return Err(refused("no idempotency_key names the grant to refund"));
    };
    if req.amount == 0 {
        return Err(refused("a refund of nothing refunds no grant"));
    }
    let response = spi::run(client, &GRANT_LOCK, &[req.subject.into(), key.into()])
        .next()
        .and_then(|row| spi::get::<pgrx::JsonB>(&row, 1))
        .map(|j| j.0);
    let Some(mut response) = response else {
        return Err(refused("no consume of this subject has that idempotency key"));
    };
    match refundable(&response, req) {
        Refundable::No(why) => Err(refused(why)),
        Refundable::Refunded(ws) => {
            metrics::count(Counter::Replays);
            let mut d = Decision::from_window(req.subject, req.metric, least_remaining(&ws), true, false);
            d.replayed = true;
            Ok(d)
        }
        Refundable::Yes(ws) => Ok(give_back(client, req, key, &mut response, ws)),
    }
}

/// What a key's stored response allows an untrusted refund of `req`.
enum Refundable {
    No(&'static str),
    /// Refunded already, by this amount: the windows as that refund left them.
    Refunded(Vec<Window>),
    /// The windows the grant charged.
    Yes(Vec<Window>),
}

fn windows_in(v: &serde_json::Value) -> Vec<Window> {
    v.as_array()
        .map(|a| a.iter().filter_map(window_from_json).collect())
        .unwrap_or_default()
}

fn refundable(response: &serde_json::Value, req: &Request<'_>) -> Refundable {
    let request = &response["request"];
    if request["action"] != "consume" || request["metric"] != req.metric {
        return Refundable::No("that idempotency key names no consume of this metric");
    }
    let granted = request["amount"].as_i64().unwrap_or(0);
    if response["decision"]["allowed"] != true || granted == 0 {
        return Refundable::No("that consume granted nothing");
    }
    if response["trusted"] == true {
        return Refundable::No("that grant was made by a trusted role, which alone can refund it");
    }
    if let Some(first) = response.get("refund") {
        let ws = windows_in(&first["windows"]);
        if first["amount"].as_i64() != Some(req.amount) || ws.is_empty() {
            return Refundable::No("that grant was refunded already");
        }
        return Refundable::Refunded(ws);
    }
    if req.amount > granted {
        return Refundable::No("a refund may not exceed the grant");
    }
    let ws = windows_in(&response["windows"]);
    if ws.is_empty() {
        return Refundable::No(
            "the grant was made before quota_ext 0.6.0, which does not know the windows it charged; a trusted caller can refund it",
        );
    }
    Refundable::Yes(ws)
}

/// The refund itself: the amount given back to the windows the grant charged, audited, and
/// recorded in the key's response so that a repeat replays it.
fn give_back(
    client: &mut SpiClient<'_>,
    req: &Request<'_>,
    key: &str,
    response: &mut serde_json::Value,
    mut ws: Vec<Window>,
) -> Decision {
    let (subject, metric, amount) = (req.subject, req.metric, req.amount);
    for w in &mut ws {
        w.used = 0;
    }
    let refs: Vec<&Window> = ws.iter().collect();
    let (periods, starts) = window_args(&refs);
    let rows = spi::run(
        client,
        &REFUND,
        &[
            subject.into(),
            metric.into(),
            amount.into(),
            periods.into(),
            starts.into(),
        ],
    );
    apply_returned(rows, &mut ws);
    let d = Decision::from_window(subject, metric, least_remaining(&ws), true, false);
    metrics::count(Counter::Refunds);
    if guc::audit_wanted(true) {
        let binding = ws
            .iter()
            .find(|w| Some(&w.period) == d.period.as_ref())
            .unwrap_or(&ws[0]);
        let mut details = details_json("", binding, &ws);
        details["plan"] = serde_json::Value::Null;
        details["grant"] = json!(key);
        audit::record(
            client,
            audit::Entry {
                subject: Some(subject),
                action: "refund",
                metric: Some(metric),
                amount: Some(amount),
                success: true,
                reason: "refunded",
                details,
                idempotency_key: Some(key),
            },
        );
    }
    response["refund"] = json!({"amount": amount, "windows": ws.iter().map(window_json).collect::<Vec<_>>()});
    spi::run(
        client,
        &KEY_SET,
        &[subject.into(), key.into(), pgrx::JsonB(response.clone()).into()],
    );
    d
}

/// One consume, refund or peek, as the caller's role may make it (see refund_grant for the
/// untrusted refund), answered from an idempotency key when it repeats one.
fn decide(client: &mut SpiClient<'_>, req: &Request<'_>) -> Result<Decision> {
    if req.action == Action::Refund && !req.trusted {
        return refund_grant(client, req);
    }
    if let Some(key) = req.key {
        let claimed = spi::run(client, &KEY_CLAIM, &[req.subject.into(), key.into()]).len() == 1;
        if !claimed {
            let d = replay(client, req, key)?;
            metrics::count(Counter::Replays);
            return Ok(d);
        }
    }
    let PlanWindows {
        plan,
        windows: mut ws,
    } = load_limits(client, req.subject, req.metric, req.claim)?;
    let outcome = match req.action {
        Action::Refund => refund_current(client, req, &mut ws),
        Action::Consume if req.amount == 0 => {
            let d = peek(client, req, &mut ws);
            store_key(client, req, &d, &[]);
            return Ok(d);
        }
        Action::Consume => charge(client, req, &plan, &mut ws)?,
    };
    let decision = outcome.decision;
    metrics::count(match (req.action, decision.allowed) {
        (Action::Refund, _) => Counter::Refunds,
        (Action::Consume, true) => Counter::Consumes,
        (Action::Consume, false) => Counter::Denials,
    });
    if guc::audit_wanted(decision.allowed) && !(outcome.audited && decision.allowed) {
        audit_decision(client, req, &plan, &ws, &decision, outcome.reason);
    }
    let charged: &[Window] = if req.action == Action::Consume && decision.allowed {
        &ws
    } else {
        &[]
    };
    store_key(client, req, &decision, charged);
    Ok(decision)
}

/// What a consume or refund decided, why (the audit row's reason), and whether the statement
/// that granted wrote the audit row itself.
struct Outcome {
    decision: Decision,
    reason: &'static str,
    audited: bool,
}

/// A trusted refund: usage given back in the current windows, never below 0 (windows without a
/// row have nothing to give back: used stays 0).
fn refund_current(client: &mut SpiClient<'_>, req: &Request<'_>, ws: &mut [Window]) -> Outcome {
    if req.amount > 0 {
        let refs: Vec<&Window> = ws.iter().collect();
        let (periods, starts) = window_args(&refs);
        let rows = spi::run(
            client,
            &REFUND,
            &[
                req.subject.into(),
                req.metric.into(),
                req.amount.into(),
                periods.into(),
                starts.into(),
            ],
        );
        apply_returned(rows, ws);
    }
    Outcome {
        decision: Decision::from_window(req.subject, req.metric, least_remaining(ws), true, false),
        reason: "refunded",
        audited: false,
    }
}

/// A peek: no write, no audit row. Allowed when one more unit would fit everywhere.
fn peek(client: &mut SpiClient<'_>, req: &Request<'_>, ws: &mut [Window]) -> Decision {
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
fn charge(client: &mut SpiClient<'_>, req: &Request<'_>, plan: &str, ws: &mut [Window]) -> Result<Outcome> {
    let (subject, metric, amount) = (req.subject, req.metric, req.amount);
    if let Some(period) = ws
        .iter()
        .filter(|w| amount > w.limit)
        .min_by_key(|w| w.limit)
        .map(|w| w.period.clone())
    {
        // Can never fit: deny without touching usage.
        read_used(client, subject, metric, ws);
        let w = ws
            .iter()
            .find(|x| x.period == period)
            .expect("the window just found");
        return Ok(Outcome {
            decision: Decision::from_window(subject, metric, w, false, true),
            reason: "exceeds_limit",
            audited: false,
        });
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
        let undo: Vec<&Window> = ws.iter().filter(|w| granted.contains(&w.period)).collect();
        let (periods, starts) = window_args(&undo);
        spi::run(
            client,
            &UNDO,
            &[
                subject.into(),
                metric.into(),
                amount.into(),
                periods.into(),
                starts.into(),
            ],
        );
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
        // The details object but for its last member, `used`, which the statement appends.
        let mut prefix = json!({"plan": plan, "period": w.period, "limit": w.limit}).to_string();
        prefix.pop();
        prefix.push_str(",\"used\":");
        args.push(prefix.into());
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
fn audit_decision(
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
        queue::refusal(queue::Refusal {
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

/// A window as kept in an idempotency key's response: what a refund of that grant gives back to.
fn window_json(w: &Window) -> serde_json::Value {
    json!({"period": w.period, "start": w.start, "reset_at": w.reset_at, "limit": w.limit, "used": w.used})
}

fn window_from_json(v: &serde_json::Value) -> Option<Window> {
    Some(Window {
        period: v.get("period")?.as_str()?.to_string(),
        start: v.get("start")?.as_i64()?,
        reset_at: v.get("reset_at").and_then(|r| r.as_i64()),
        limit: v.get("limit")?.as_i64()?,
        used: v.get("used").and_then(|u| u.as_i64()).unwrap_or(0),
    })
}

/// Keep the decision under the request's idempotency key, with the windows a grant charged
/// (`charged`), which an untrusted refund of that grant gives back to.
fn store_key(client: &mut SpiClient<'_>, req: &Request<'_>, d: &Decision, charged: &[Window]) {
    if let Some(key) = req.key {
        let mut response = json!({"request": req.json(), "decision": d.to_json()});
        if !charged.is_empty() {
            response["windows"] = charged.iter().map(window_json).collect();
            // A trusted role's grant (a service charging the subject) is the service's to
            // refund, not the subject's.
            response["trusted"] = json!(req.trusted);
        }
        spi::run(
            client,
            &KEY_SET,
            &[req.subject.into(), key.into(), pgrx::JsonB(response).into()],
        );
    }
}

/// The JWT claim app_metadata.plan, when the call acts on the JWT's own subject (a trusted
/// caller acting for someone else does not lend that subject its own claim). Claims that do
/// not parse claim nothing: an untrusted caller was refused for them already (it needs its
/// subject from them), and a trusted one naming a subject does not need them.
fn own_plan_claim(subject: &str) -> Option<String> {
    let req = request::request_info().ok()?;
    req.plan.filter(|_| req.sub.as_deref() == Some(subject))
}

fn run_request(
    action: Action,
    subject: Option<&str>,
    metric: Option<&str>,
    amount: Option<i64>,
    idempotency_key: Option<&str>,
    queue_denial: bool,
) -> Result<Decision> {
    queue::relaunch_stranded();
    let metric = check_metric(metric)?;
    let amount = check_amount(amount)?;
    let key = check_idempotency_key(idempotency_key)?;
    let subject = request::resolve_subject(subject)?;
    let trusted = request::is_trusted();
    let claim = own_plan_claim(&subject);
    let _owner = AsOwner::enter();
    Spi::connect_mut(|client| {
        decide(
            client,
            &Request {
                action,
                subject: &subject,
                metric: &metric,
                amount,
                key: key.as_deref(),
                trusted,
                claim: claim.as_deref(),
                queue_denial,
            },
        )
    })
}

/// Check and count `amount` units of `metric` for `subject` in every period that limits it.
#[pg_extern(volatile, parallel_unsafe)]
fn consume(
    subject: default!(Option<&str>, "NULL"),
    metric: default!(Option<&str>, "NULL"),
    amount: default!(Option<i64>, 1),
    idempotency_key: default!(Option<&str>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::composite_type!('static, "quota.decision") {
    run_request(Action::Consume, subject, metric, amount, idempotency_key, false)
        .or_raise()
        .into_row(Some(fcinfo))
}

/// What quota.require decides, without raising: consume, except that a denial's audit row is
/// queued for the audit writer instead of written in the caller's transaction, which the
/// PT429 that require raises next rolls back. Called by require (plpgsql, since PostgreSQL
/// raises custom SQLSTATEs from there and pgrx cannot).
#[pg_extern(volatile, parallel_unsafe)]
fn require_decision(
    subject: default!(Option<&str>, "NULL"),
    metric: default!(Option<&str>, "NULL"),
    amount: default!(Option<i64>, 1),
    idempotency_key: default!(Option<&str>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::composite_type!('static, "quota.decision") {
    run_request(Action::Consume, subject, metric, amount, idempotency_key, true)
        .or_raise()
        .into_row(Some(fcinfo))
}

/// Give usage back in the current windows (never below zero).
#[pg_extern(volatile, parallel_unsafe)]
fn refund(
    subject: default!(Option<&str>, "NULL"),
    metric: default!(Option<&str>, "NULL"),
    amount: default!(Option<i64>, 1),
    idempotency_key: default!(Option<&str>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::composite_type!('static, "quota.decision") {
    run_request(Action::Refund, subject, metric, amount, idempotency_key, false)
        .or_raise()
        .into_row(Some(fcinfo))
}

static STATUS: Stmt = Stmt {
    sql: "
WITH s AS (SELECT coalesce(sj.plan, (SELECT p.plan FROM quota.plans AS p WHERE p.plan = $3), $2) AS plan,
                  coalesce(sj.time_zone, 'UTC') AS tz
             FROM (SELECT) AS one LEFT JOIN quota.subjects AS sj ON sj.subject = $1),
     lim AS (SELECT o.metric, o.period, o.max_amount FROM quota.overrides AS o WHERE o.subject = $1
             UNION ALL
             SELECT l.metric, l.period, l.max_amount FROM quota.limits AS l, s
              WHERE l.plan = s.plan
                AND NOT EXISTS (SELECT FROM quota.overrides AS o
                                 WHERE o.subject = $1 AND o.metric = l.metric AND o.period = l.period))
SELECT lim.metric, lim.period, lim.max_amount, w.window_start, w.reset_at, coalesce(u.used, 0)
  FROM lim CROSS JOIN s
 CROSS JOIN LATERAL quota.window_bounds(lim.period, s.tz) AS w
  LEFT JOIN quota.usage AS u
    ON u.subject = $1 AND u.metric = lim.metric AND u.period = lim.period
   AND u.window_start = w.window_start
 ORDER BY lim.metric,
          pg_catalog.array_position('{minute,hour,day,week,month,year,total}'::text[], lim.period)",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID],
};

/// One row per metric and period that applies to the subject; consumes nothing. `allowed` says
/// whether one more unit would fit in that window.
#[pg_extern(stable, parallel_restricted)]
fn status(
    subject: default!(Option<&str>, "NULL"),
) -> SetOfIterator<'static, pgrx::composite_type!('static, "quota.decision")> {
    let subject = request::resolve_subject(subject).or_raise();
    let claim = own_plan_claim(&subject);
    let _owner = AsOwner::enter();
    let rows: Vec<(String, Window)> = Spi::connect_mut(|client| {
        spi::run(
            client,
            &STATUS,
            &[subject.as_str().into(), guc::default_plan().into(), claim.into()],
        )
        .map(|row| {
            (
                spi::get::<String>(&row, 1).expect("metric"),
                Window {
                    period: spi::get::<String>(&row, 2).expect("period"),
                    limit: spi::get::<i64>(&row, 3).expect("limit"),
                    start: ts(&row, 4).expect("window_start"),
                    reset_at: ts(&row, 5),
                    used: spi::get::<i64>(&row, 6).unwrap_or(0),
                },
            )
        })
        .collect()
    });
    drop(_owner);
    let decisions: Vec<DecisionRow> = rows
        .into_iter()
        .map(|(metric, w)| {
            Decision::from_window(&subject, &metric, &w, w.remaining() > 0, false).into_row(None)
        })
        .collect();
    SetOfIterator::new(decisions)
}

// ---------------------------------------------------------------------------------------------
// Administration (trusted callers only)

static PLAN_EXISTS: Stmt = Stmt {
    sql: "SELECT FROM quota.plans WHERE plan = $1",
    args: &[T::TEXTOID],
};

static CHECK_TZ: Stmt = Stmt {
    // Raises 22023 "time zone ... not recognized" for a bad name, before anything is written.
    sql: "SELECT pg_catalog.timezone($1, pg_catalog.now())",
    args: &[T::TEXTOID],
};

static SET_PLAN: Stmt = Stmt {
    sql: "
INSERT INTO quota.subjects AS s (subject, plan, time_zone) VALUES ($1, $2, coalesce($3, 'UTC'))
    ON CONFLICT (subject) DO UPDATE SET plan = excluded.plan, time_zone = coalesce($3, s.time_zone)",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID],
};

fn ensure_plan(client: &mut SpiClient<'_>, plan: &str) -> Result<()> {
    if spi::run(client, &PLAN_EXISTS, &[plan.into()]).is_empty() {
        return Err(QuotaError::UnknownPlan(plan.to_string()));
    }
    Ok(())
}

/// Put a subject on a plan, optionally in a time zone (NULL keeps the current one, or UTC).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn set_plan(
    subject: Option<&str>,
    plan: Option<&str>,
    time_zone: default!(Option<&str>, "NULL"),
) -> std::result::Result<(), ErrorReport> {
    request::require_trusted("quota.set_plan")?;
    let subject = request::check_name("subject", subject, "Pass the subject to put on a plan.")?;
    let plan = request::check_name("plan", plan, "Pass a plan from quota.plans.")?;
    if let Some(tz) = time_zone {
        request::check_present("time_zone", tz)?;
    }
    let _owner = AsOwner::enter();
    Spi::connect_mut(|client| -> Result<()> {
        ensure_plan(client, &plan)?;
        if let Some(tz) = time_zone {
            spi::run(client, &CHECK_TZ, &[tz.into()]);
        }
        spi::run(
            client,
            &SET_PLAN,
            &[subject.into(), plan.into(), time_zone.into()],
        );
        audit::admin(
            client,
            &subject,
            "set_plan",
            None,
            json!({"plan": plan, "time_zone": time_zone}),
        );
        Ok(())
    })?;
    Ok(())
}

static SET_LIMIT: Stmt = Stmt {
    sql: "INSERT INTO quota.limits (plan, metric, period, max_amount) VALUES ($1, $2, $3, $4)
          ON CONFLICT (plan, metric, period) DO UPDATE SET max_amount = excluded.max_amount",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID, T::INT8OID],
};
static DEL_LIMIT: Stmt = Stmt {
    sql: "DELETE FROM quota.limits WHERE plan = $1 AND metric = $2 AND period = $3",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID],
};

/// The arguments set_limit and set_override share: a metric, a period, and a max_amount that
/// is not negative (NULL deletes).
fn check_limit<'a>(
    metric: Option<&'a str>,
    period: Option<&str>,
    max_amount: Option<i64>,
) -> Result<(&'a str, String)> {
    let metric = check_metric(metric)?;
    let period = check_period(period)?;
    if let Some(m) = max_amount.filter(|m| *m < 0) {
        return Err(QuotaError::Negative {
            what: "max_amount",
            value: m,
        });
    }
    Ok((metric, period))
}

/// Set a plan's limit for a metric and period; NULL deletes it.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn set_limit(
    plan: Option<&str>,
    metric: Option<&str>,
    period: Option<&str>,
    max_amount: Option<i64>,
) -> std::result::Result<(), ErrorReport> {
    request::require_trusted("quota.set_limit")?;
    let plan = request::check_name("plan", plan, "Pass a plan from quota.plans.")?;
    let (metric, period) = check_limit(metric, period, max_amount)?;
    let _owner = AsOwner::enter();
    Spi::connect_mut(|client| -> Result<()> {
        ensure_plan(client, &plan)?;
        let (p, m, pe) = (plan, metric, period.as_str());
        match max_amount {
            Some(max) => spi::run(client, &SET_LIMIT, &[p.into(), m.into(), pe.into(), max.into()]),
            None => spi::run(client, &DEL_LIMIT, &[p.into(), m.into(), pe.into()]),
        };
        audit::admin(
            client,
            "",
            "set_limit",
            Some(m),
            json!({"plan": p, "period": pe, "max_amount": max_amount}),
        );
        Ok(())
    })?;
    Ok(())
}

static SET_OVERRIDE: Stmt = Stmt {
    sql: "INSERT INTO quota.overrides (subject, metric, period, max_amount) VALUES ($1, $2, $3, $4)
          ON CONFLICT (subject, metric, period) DO UPDATE SET max_amount = excluded.max_amount",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID, T::INT8OID],
};
static DEL_OVERRIDE: Stmt = Stmt {
    sql: "DELETE FROM quota.overrides WHERE subject = $1 AND metric = $2 AND period = $3",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID],
};

/// Replace the plan's limit for one subject, metric and period; NULL deletes the override.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn set_override(
    subject: Option<&str>,
    metric: Option<&str>,
    period: Option<&str>,
    max_amount: Option<i64>,
) -> std::result::Result<(), ErrorReport> {
    request::require_trusted("quota.set_override")?;
    let subject = request::check_name("subject", subject, "Pass the subject the override is for.")?;
    let (metric, period) = check_limit(metric, period, max_amount)?;
    let _owner = AsOwner::enter();
    Spi::connect_mut(|client| -> Result<()> {
        let (s, m, pe) = (subject, metric, period.as_str());
        match max_amount {
            Some(max) => spi::run(
                client,
                &SET_OVERRIDE,
                &[s.into(), m.into(), pe.into(), max.into()],
            ),
            None => spi::run(client, &DEL_OVERRIDE, &[s.into(), m.into(), pe.into()]),
        };
        audit::admin(
            client,
            s,
            "set_override",
            Some(m),
            json!({"period": pe, "max_amount": max_amount}),
        );
        Ok(())
    })?;
    Ok(())
}

static RESET: Stmt = Stmt {
    sql: "DELETE FROM quota.usage WHERE subject = $1 AND ($2::text IS NULL OR metric = $2)",
    args: &[T::TEXTOID, T::TEXTOID],
};

/// Delete a subject's usage (of one metric, or all); returns the number of windows deleted.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn reset_usage(
    subject: Option<&str>,
    metric: default!(Option<&str>, "NULL"),
) -> std::result::Result<i64, ErrorReport> {
    request::require_trusted("quota.reset_usage")?;
    let subject = request::check_name("subject", subject, "Pass the subject whose usage to reset.")?;
    if let Some(m) = metric {
        request::check_present("metric", m)?;
    }
    let _owner = AsOwner::enter();
    Ok(Spi::connect_mut(|client| {
        let n = spi::run(client, &RESET, &[subject.into(), metric.into()]).len() as i64;
        audit::admin(
            client,
            &subject,
            "reset_usage",
            metric,
            json!({"windows_deleted": n}),
        );
        n
    }))
}

static NEAR: Stmt = Stmt {
    sql: "
SELECT u.subject, u.metric, u.period, u.used, e.max_amount,
       CASE WHEN e.max_amount > 0 THEN u.used::float8 / e.max_amount
            ELSE 'Infinity'::float8 END AS ratio,
       w.reset_at
  FROM quota.usage AS u
  LEFT JOIN quota.subjects AS s ON s.subject = u.subject
 CROSS JOIN LATERAL (SELECT coalesce(
          (SELECT o.max_amount FROM quota.overrides AS o
            WHERE o.subject = u.subject AND o.metric = u.metric AND o.period = u.period),
          (SELECT l.max_amount FROM quota.limits AS l
            WHERE l.plan = coalesce(s.plan, $2) AND l.metric = u.metric AND l.period = u.period))
       ) AS e(max_amount)
 CROSS JOIN LATERAL quota.window_bounds(u.period, coalesce(s.time_zone, 'UTC')) AS w
 WHERE u.window_start = w.window_start
   AND e.max_amount IS NOT NULL
   AND u.used > 0
   AND u.used >= $1 * e.max_amount
 ORDER BY ratio DESC, u.subject, u.metric,
          pg_catalog.array_position('{minute,hour,day,week,month,year,total}'::text[], u.period)",
    args: &[T::FLOAT8OID, T::TEXTOID],
};

/// Subjects whose current-window usage is at least `threshold` of their limit, highest first.
#[pg_extern(stable, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn near_limit(
    threshold: default!(Option<f64>, 0.8),
) -> TableIterator<
    'static,
    (
        name!(subject, String),
        name!(metric, String),
        name!(period, String),
        name!(used, i64),
        name!(quota_limit, i64),
        name!(ratio, f64),
        name!(reset_at, Option<TimestampWithTimeZone>),
    ),
> {
    request::require_trusted("quota.near_limit").or_raise();
    let t = threshold.unwrap_or(0.8);
    if !t.is_finite() || t < 0.0 {
        QuotaError::OutOfRange {
            what: "threshold",
            value: t,
            min: 0.0,
            max: f64::MAX,
        }
        .raise();
    }
    let _owner = AsOwner::enter();
    let rows: Vec<_> = Spi::connect_mut(|client| {
        spi::run(client, &NEAR, &[t.into(), guc::default_plan().into()])
            .map(|row| {
                (
                    spi::get::<String>(&row, 1).expect("subject"),
                    spi::get::<String>(&row, 2).expect("metric"),
                    spi::get::<String>(&row, 3).expect("period"),
                    spi::get::<i64>(&row, 4).expect("used"),
                    spi::get::<i64>(&row, 5).expect("limit"),
                    spi::get::<f64>(&row, 6).expect("ratio"),
                    spi::get::<TimestampWithTimeZone>(&row, 7),
                )
            })
            .collect()
    });
    TableIterator::new(rows)
}
