//! Checking and charging the windows of one (subject, metric), and of its ancestors that limit
//! the metric (pooled quotas): the usage statements, the windows, a peek, a charge and its
//! audit row.

use super::cache;
use super::decision::{latest_reset, least_remaining, window_args, Decision, Window};
use super::hot;
use super::Request;
use crate::audit;
use crate::audit::refusal::{self, Refusal};
use crate::pg::catalog;
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

/// UPSERT where windows may be hot (quota.usage_stripes exists, 0.10.0): a window's usage is
/// its row plus its stripes (see hot.rs), in the check of a new row as of an existing one, and
/// in what the statement returns.
static UPSERT_S: Stmt = Stmt {
    sql: concat!(
        "
INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
SELECT t.subject, $2, t.period, t.window_start, $3
  FROM unnest($1::text[], $4::text[], $5::timestamptz[]) AS t(subject, period, window_start)
 WHERE $3 + ",
        super::stripes::stripes_sum!("t.subject", "$2", "t.period", "t.window_start"),
        "
       <= ($6::bigint[])[pg_catalog.array_position($7::text[], t.period || ':' || t.subject)]
    ON CONFLICT (subject, metric, period, window_start) DO UPDATE
   SET used = u.used + excluded.used
 WHERE u.used + ",
        super::stripes::stripes_of_u!(),
        " <= ($6::bigint[])[pg_catalog.array_position($7::text[], u.period || ':' || u.subject)] - excluded.used
RETURNING u.subject, u.period, u.used + ",
        super::stripes::stripes_of_u!()
    ),
    args: UPSERT.args,
};

/// UPSERT_ONE where windows may be hot (see UPSERT_S); the stripes read once.
macro_rules! upsert_one_s {
    () => {
        concat!(
            "st AS (SELECT ",
            super::stripes::stripes_sum!("$1", "$2", "$3", "$4"),
            " AS n),
u AS (
INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
SELECT $1, $2, $3, $4, $5 FROM st WHERE $5 + st.n <= $6
    ON CONFLICT (subject, metric, period, window_start) DO UPDATE
   SET used = u.used + excluded.used
 WHERE u.used + (SELECT st.n FROM st) <= $6 - excluded.used
RETURNING u.subject, u.period, u.used + (SELECT st.n FROM st) AS used)"
        )
    };
}

static UPSERT_ONE_S: Stmt = Stmt {
    sql: concat!("WITH ", upsert_one_s!(), " SELECT subject, period, used FROM u"),
    args: UPSERT_ONE.args,
};

static UPSERT_ONE_AUDITED_S: Stmt = Stmt {
    sql: concat!(
        "WITH ",
        upsert_one_s!(),
        ",
a AS (
    INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details, idempotency_key, actor)
    SELECT $1, 'consume', $2, $5, true, 'granted', $7 || pg_catalog.jsonb_build_object('used', u.used), $8, $9
      FROM u)
SELECT subject, period, used FROM u"
    ),
    args: UPSERT_ONE_AUDITED.args,
};

/// The audit row the statement above wrote in this call, taken back when the grant is undone
/// after all (a window that turned hot meanwhile had no room, see charge).
static AUDIT_UNDO: Stmt = Stmt {
    sql: "DELETE FROM quota.audit_log
           WHERE subject = $1 AND id = pg_catalog.currval('quota.audit_log_id_seq'::pg_catalog.regclass)",
    args: &[T::TEXTOID],
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

/// READ where windows may be hot: the row plus the stripes.
static READ_S: Stmt = Stmt {
    sql: concat!(
        "
SELECT t.period, coalesce(u.used, 0) + ",
        super::stripes::stripes_sum!("$1", "$2", "t.period", "t.window_start"),
        "
  FROM unnest($4::text[], $5::timestamptz[]) AS t(period, window_start)
  LEFT JOIN quota.usage AS u
    ON u.subject = $1 AND u.metric = $2 AND u.period = t.period AND u.window_start = t.window_start"
    ),
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
    let stmt = if catalog::has_stripes() { &READ_S } else { &READ };
    let rows = on_windows(client, stmt, req, &refs);
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
///
/// Cold windows first (their row locks, in lock order), each checked afterwards against the
/// hot table in case it turned hot while the lock was awaited (hot.rs); then the hot windows,
/// taken from shared memory, and written to this backend's stripes. A window that stopped being
/// hot between the two (its slot freed) goes round again as a cold one.
pub(super) fn charge(client: &mut SpiClient<'_>, req: &Request<'_>, pw: &mut PlanWindows) -> Result<Outcome> {
    let (subject, metric, amount) = (req.subject, req.metric, req.amount);
    if let Some(out) = never_fits(client, req, &mut pw.windows) {
        return Ok(out);
    }
    let striped = catalog::has_stripes() && hot::may_charge() && catalog::lock_usage_tables();
    let keys = hot_keys(req, &pw.windows, striped);
    if keys.iter().any(Option::is_some) {
        turn_busy_windows_hot(client, req, &pw.windows, &keys);
    }
    let n = pw.windows.len();
    let is_hot = |i: usize| keys[i].is_some_and(hot::is_hot);
    let (mut pending, mut hot_candidates): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| !is_hot(i));
    let mut held = Held::default();
    loop {
        if !pending.is_empty() {
            if let Err(denying) = cold_round(client, req, pw, &keys, &pending, striped, &mut held) {
                return deny(client, req, pw, &held, denying);
            }
            pending.clear();
        }
        for i in std::mem::take(&mut hot_candidates) {
            let w = &mut pw.windows[i];
            match hot::take(keys[i].expect("a hot window has a key"), amount, w.limit) {
                hot::Take::Granted { used, ticket } => {
                    w.used = used;
                    held.tickets.push(ticket);
                    held.hot.push(i);
                }
                hot::Take::Denied { used } => {
                    w.used = used;
                    held.hot_denied.push(i);
                    return deny(client, req, pw, &held, vec![i]);
                }
                hot::Take::Cold => pending.push(i),
            }
        }
        if pending.is_empty() {
            break;
        }
    }
    if !held.hot.is_empty() {
        let ws = &pw.windows;
        if let ([w], true) = (&ws[..], guc::audit_wanted(true) && ws[0].subject == subject) {
            let details = json!({"plan": pw.plan, "period": w.period, "limit": w.limit, "used": w.used});
            super::stripes::write_one_audited(client, req, w, details);
            held.audited = true;
        } else {
            let refs: Vec<&Window> = held.hot.iter().map(|&i| &ws[i]).collect();
            super::stripes::write(client, metric, amount, &refs);
        }
    }
    Ok(Outcome {
        decision: Decision::from_window(subject, metric, least_remaining(&pw.windows), true, false),
        reason: "granted",
        audited: held.audited,
    })
}

/// What a charge holds so far: windows granted cold (their rows incremented and locked) and
/// hot (taken from shared memory), the reservations to give back if it ends up denying, and
/// whether a statement already wrote the grant's audit row.
#[derive(Default)]
struct Held {
    cold: Vec<usize>,
    hot: Vec<usize>,
    hot_denied: Vec<usize>,
    tickets: Vec<usize>,
    audited: bool,
}

/// The hot table's key of each window: none when the windows cannot be hot (no table, tables
/// older than 0.10.0, a read-only transaction).
fn hot_keys(req: &Request<'_>, ws: &[Window], striped: bool) -> Vec<Option<hot::Key>> {
    if !striped || !hot::may_charge() {
        return vec![None; ws.len()];
    }
    ws.iter()
        .map(|w| hot::key(&w.subject, req.metric, &w.period, w.start))
        .collect()
}

/// Count this consume in the detector, once per subject of the windows, and turn the windows of
/// a busy subject hot (before any row of this call is locked, see stripes::load).
fn turn_busy_windows_hot(
    client: &mut SpiClient<'_>,
    req: &Request<'_>,
    ws: &[Window],
    keys: &[Option<hot::Key>],
) {
    let mut i = 0;
    while i < ws.len() {
        let subject = &ws[i].subject;
        let end = i + ws[i..].iter().take_while(|w| w.subject == *subject).count();
        if hot::busy(subject, req.metric) {
            for j in i..end {
                if let Some(k) = keys[j].filter(|k| !hot::is_hot(*k)) {
                    super::stripes::load(client, req.metric, &ws[j], k);
                }
            }
        }
        i = end;
    }
}

/// Increment the cold windows `idx` (in lock order); a window granted that turned hot meanwhile
/// is taken from shared memory too (hot.rs: the loader did not count it). Err: the windows that
/// denied.
fn cold_round(
    client: &mut SpiClient<'_>,
    req: &Request<'_>,
    pw: &mut PlanWindows,
    keys: &[Option<hot::Key>],
    idx: &[usize],
    striped: bool,
    held: &mut Held,
) -> std::result::Result<(), Vec<usize>> {
    let freed_before = hot::freed();
    let counted = striped && count_stripes(client, keys, idx);
    let (rows, audited) = increment(client, req, &pw.plan, &pw.windows, idx, counted);
    let got = apply_returned(returned(rows), &mut pw.windows);
    held.audited |= audited && !got.is_empty();
    // A statement that did not count the stripes, during which a slot was freed (whose window
    // may be one of these, charged hot meanwhile): check the windows granted against their
    // rows plus stripes now (see hot::may_have_stripes).
    let recheck = striped && !counted && hot::freed() != freed_before;
    if recheck {
        let mut now: Vec<Window> = idx
            .iter()
            .filter(|&&i| is_in(&pw.windows[i], &got))
            .map(|&i| pw.windows[i].clone())
            .collect();
        read_used(client, req, &mut now);
        for w in now.iter().filter(|w| w.used > w.limit) {
            if let Some(i) = idx
                .iter()
                .copied()
                .find(|&i| pw.windows[i].subject == w.subject && pw.windows[i].period == w.period)
            {
                pw.windows[i].used = w.used;
            }
        }
    }
    let mut denying = Vec::new();
    for &i in idx {
        let w = &mut pw.windows[i];
        if !is_in(w, &got) {
            denying.push(i);
            continue;
        }
        held.cold.push(i);
        if recheck && w.used > w.limit {
            denying.push(i);
            continue;
        }
        if let Some(k) = keys[i] {
            match hot::take(k, req.amount, w.limit) {
                hot::Take::Granted { used, ticket } => {
                    w.used = used;
                    held.tickets.push(ticket);
                }
                hot::Take::Denied { used } => {
                    w.used = used;
                    held.hot_denied.push(i);
                    denying.push(i);
                }
                hot::Take::Cold => {}
            }
        }
    }
    if denying.is_empty() {
        Ok(())
    } else {
        Err(denying)
    }
}

/// Some window denied: give back what the others were given (the cold rows are still locked by
/// this call; the hot reservations were not written anywhere yet), then answer with the windows
/// that denied.
fn deny(
    client: &mut SpiClient<'_>,
    req: &Request<'_>,
    pw: &mut PlanWindows,
    held: &Held,
    denying: Vec<usize>,
) -> Result<Outcome> {
    let (subject, metric, amount) = (req.subject, req.metric, req.amount);
    for &t in &held.tickets {
        hot::undo(t);
    }
    if !held.cold.is_empty() {
        let undo: Vec<&Window> = held.cold.iter().map(|&i| &pw.windows[i]).collect();
        on_windows(client, &UNDO, req, &undo);
    }
    if held.audited {
        spi::run(client, &AUDIT_UNDO, &[subject.into()]);
    }
    // What the hot table said for the windows it refused: it counts grants in flight too.
    let seen: Vec<(usize, i64)> = held.hot_denied.iter().map(|&i| (i, pw.windows[i].used)).collect();
    read_used(client, req, &mut pw.windows);
    for (i, used) in seen {
        let w = &mut pw.windows[i];
        w.used = w.used.max(used);
    }
    let ws = &pw.windows;
    let denying: Vec<&Window> = denying.iter().map(|&i| &ws[i]).collect();
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

thread_local! {
    /// Whether quota.usage_stripes had rows when this backend first charged (stripes of an
    /// earlier life of the server, which no slot of this one knows), for the files of the
    /// tables it looked at (catalog::usage_files).
    static OLD_STRIPES: std::cell::Cell<Option<(u64, bool)>> = const { std::cell::Cell::new(None) };
}

static ANY_STRIPES: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT FROM quota.usage_stripes)",
    args: &[],
};

/// Whether quota.usage_stripes had rows when this backend first looked (once per backend and
/// per files of the usage tables). Stripes written since are those of windows the hot table
/// knows (hot::may_have_stripes).
fn old_stripes(client: &mut SpiClient<'_>) -> bool {
    let files = catalog::usage_files();
    if let Some((f, any)) = OLD_STRIPES.with(std::cell::Cell::get) {
        if f == files {
            return any;
        }
    }
    let any = spi::run(client, &ANY_STRIPES, &[])
        .next()
        .and_then(|r| spi::get::<bool>(&r, 1))
        .unwrap_or(true);
    OLD_STRIPES.with(|o| o.set(Some((files, any))));
    any
}

/// Whether a cold grant of these windows must count their stripes: the tables have them
/// (0.10.0) and one of the windows may have some (hot::may_have_stripes, old_stripes). Without
/// any, the statements of 0.9.0 do (cheaper: no look-up of quota.usage_stripes).
fn count_stripes(client: &mut SpiClient<'_>, keys: &[Option<hot::Key>], idx: &[usize]) -> bool {
    if !catalog::has_stripes() {
        return false;
    }
    if idx.iter().any(|&i| keys[i].is_none()) || old_stripes(client) {
        return true;
    }
    idx.iter().any(|&i| keys[i].is_some_and(hot::may_have_stripes))
}

/// The increment of the cold windows `idx` itself: the windows it granted, and whether the
/// statement also wrote the grant's audit row (the common case of one window of the subject's
/// own, with auditing on, takes one statement). `striped`: the tables have quota.usage_stripes
/// (0.10.0), whose rows a window's usage counts too.
fn increment<'conn>(
    client: &mut SpiClient<'conn>,
    req: &Request<'_>,
    plan: &str,
    all: &[Window],
    idx: &[usize],
    striped: bool,
) -> (pgrx::spi::SpiTupleTable<'conn>, bool) {
    let (metric, amount) = (req.metric, req.amount);
    let ws: Vec<&Window> = idx.iter().map(|&i| &all[i]).collect();
    if let [w] = ws[..] {
        let start = TimestampWithTimeZone::try_from(w.start).expect("window start");
        let mut args = vec![
            w.subject.as_str().into(),
            metric.into(),
            w.period.as_str().into(),
            start.into(),
            amount.into(),
            w.limit.into(),
        ];
        if all.len() != 1 || !guc::audit_wanted(true) || w.subject != req.subject {
            let stmt = if striped { &UPSERT_ONE_S } else { &UPSERT_ONE };
            return (spi::run(client, stmt, &args), false);
        }
        // The details but for `used`, which the statement adds.
        args.push(pgrx::JsonB(json!({"plan": plan, "period": w.period, "limit": w.limit})).into());
        args.push(req.key.into());
        args.push(request::actor().into());
        let stmt = if striped {
            &UPSERT_ONE_AUDITED_S
        } else if catalog::audit_has_actor() {
            &UPSERT_ONE_AUDITED
        } else {
            &UPSERT_ONE_AUDITED_0_5
        };
        return (spi::run(client, stmt, &args), true);
    }
    let (subjects, periods, starts) = window_args(&ws);
    let limits: Vec<i64> = ws.iter().map(|w| w.limit).collect();
    let keys: Vec<String> = ws.iter().map(|w| format!("{}:{}", w.period, w.subject)).collect();
    let rows = spi::run(
        client,
        if striped { &UPSERT_S } else { &UPSERT },
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
