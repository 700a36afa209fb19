//! Reading usage: `status` (one subject's windows) and `near_limit` (who is close to a limit).

use super::charge::ts;
use super::decision::{Decision, DecisionRow, Window};
use super::own_claims;
use crate::pg::error::{OrRaise, QuotaError};
use crate::pg::guc;
use crate::pg::spi::{self, Stmt};
use crate::request::{self, AsOwner};
use pgrx::prelude::*;
use pgrx::PgBuiltInOids as T;

macro_rules! status_sql {
    ($used:expr) => {
        concat!(
            "
WITH s AS (SELECT coalesce(sj.plan, (SELECT p.plan FROM quota.plans AS p WHERE p.plan = $3), $2) AS plan,
                  coalesce(sj.time_zone, 'UTC') AS tz
             FROM (SELECT) AS one LEFT JOIN quota.subjects AS sj ON sj.subject = $1),
     lim AS (SELECT o.metric, o.period, o.max_amount FROM quota.overrides AS o WHERE o.subject = $1
             UNION ALL
             SELECT l.metric, l.period, l.max_amount FROM quota.limits AS l, s
              WHERE l.plan = s.plan
                AND NOT EXISTS (SELECT FROM quota.overrides AS o
                                 WHERE o.subject = $1 AND o.metric = l.metric AND o.period = l.period))
SELECT lim.metric, lim.period, lim.max_amount, w.window_start, w.reset_at, ",
            $used,
            "
  FROM lim CROSS JOIN s
 CROSS JOIN LATERAL quota.window_bounds(lim.period, s.tz) AS w
  LEFT JOIN quota.usage AS u
    ON u.subject = $1 AND u.metric = lim.metric AND u.period = lim.period
   AND u.window_start = w.window_start
 ORDER BY lim.metric,
          pg_catalog.array_position('{minute,hour,day,week,month,year,total}'::text[], lim.period)"
        )
    };
}

static STATUS: Stmt = Stmt {
    sql: status_sql!("coalesce(u.used, 0)"),
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID],
};

/// STATUS where windows may be hot (0.10.0): a window's usage is its row plus its stripes.
static STATUS_S: Stmt = Stmt {
    sql: status_sql!(concat!(
        "coalesce(u.used, 0) + ",
        super::stripes::stripes_sum!("$1", "lim.metric", "lim.period", "w.window_start")
    )),
    args: STATUS.args,
};

/// One row per metric and period that applies to the subject, then to each of its ancestors
/// (pooled quotas), each row's binding_subject naming whose window it is; consumes nothing.
/// `allowed` says whether one more unit would fit in that window.
#[pg_extern(stable, parallel_restricted)]
fn status(
    subject: default!(Option<&str>, "NULL"),
) -> SetOfIterator<'static, pgrx::composite_type!('static, "quota.decision")> {
    let subject = request::resolve_subject(subject).or_raise();
    let (claim, parent_claim) = own_claims(&subject);
    let _owner = AsOwner::enter();
    let rows: Vec<(String, Window)> = Spi::connect_mut(|client| {
        super::cache::prepare();
        let chain = super::chain::ancestors(client, &subject, parent_claim.as_deref()).or_raise();
        let mut rows = Vec::new();
        for (i, link) in chain.iter().enumerate() {
            let claim = if i == 0 { claim.as_deref() } else { None };
            rows.extend(
                spi::run(
                    client,
                    if crate::pg::catalog::has_stripes() {
                        &STATUS_S
                    } else {
                        &STATUS
                    },
                    &[
                        link.subject.as_str().into(),
                        guc::default_plan().into(),
                        claim.into(),
                    ],
                )
                .map(|row| {
                    (
                        spi::get::<String>(&row, 1).expect("metric"),
                        Window {
                            subject: link.subject.clone(),
                            period: spi::get::<String>(&row, 2).expect("period"),
                            limit: spi::get::<i64>(&row, 3).expect("limit"),
                            start: ts(&row, 4).expect("window_start"),
                            reset_at: ts(&row, 5),
                            used: spi::get::<i64>(&row, 6).unwrap_or(0),
                        },
                    )
                }),
            );
        }
        rows
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

/// The current window of each period in each time zone in use, then the usage rows of those
/// windows only, found through usage_period_window_idx: the cost follows the current windows, not
/// the history of old ones. A row counts when its window is the current one in its subject's
/// time zone; organizations are subjects like any other.
macro_rules! near_sql {
    ($tot:expr) => {
        concat!(
            "
WITH zones AS (SELECT sj.time_zone FROM quota.subjects AS sj UNION SELECT 'UTC'),
     cur AS (SELECT z.time_zone, p.period, w.window_start, w.reset_at
               FROM zones AS z
              CROSS JOIN unnest('{minute,hour,day,week,month,year,total}'::text[]) AS p(period)
              CROSS JOIN LATERAL quota.window_bounds(p.period, z.time_zone) AS w),
     starts AS (SELECT DISTINCT c.period, c.window_start FROM cur AS c)
SELECT u.subject, u.metric, u.period, tot.used, e.max_amount,
       CASE WHEN e.max_amount > 0 THEN tot.used::float8 / e.max_amount
            ELSE 'Infinity'::float8 END AS ratio,
       c.reset_at
  FROM starts AS st
  JOIN quota.usage AS u ON u.period = st.period AND u.window_start = st.window_start
  LEFT JOIN quota.subjects AS s ON s.subject = u.subject
  JOIN cur AS c
    ON c.time_zone = coalesce(s.time_zone, 'UTC') AND c.period = u.period
   AND c.window_start = u.window_start
",
            $tot,
            "
 CROSS JOIN LATERAL (SELECT coalesce(
          (SELECT o.max_amount FROM quota.overrides AS o
            WHERE o.subject = u.subject AND o.metric = u.metric AND o.period = u.period),
          (SELECT l.max_amount FROM quota.limits AS l
            WHERE l.plan = coalesce(s.plan, $2) AND l.metric = u.metric AND l.period = u.period))
       ) AS e(max_amount)
 WHERE e.max_amount IS NOT NULL
   AND tot.used > 0
   AND tot.used >= $1 * e.max_amount
 ORDER BY ratio DESC, u.subject, u.metric,
          pg_catalog.array_position('{minute,hour,day,week,month,year,total}'::text[], u.period)"
        )
    };
}

static NEAR: Stmt = Stmt {
    sql: near_sql!(" CROSS JOIN LATERAL (SELECT u.used) AS tot(used)"),
    args: &[T::FLOAT8OID, T::TEXTOID],
};

/// NEAR where windows may be hot (0.10.0): a window's usage is its row plus its stripes.
static NEAR_S: Stmt = Stmt {
    sql: near_sql!(concat!(
        " CROSS JOIN LATERAL (SELECT u.used + ",
        super::stripes::stripes_of_u!(),
        ") AS tot(used)"
    )),
    args: NEAR.args,
};

/// Subjects (members and organizations alike) whose current-window usage is at least
/// `threshold` of their limit, highest first.
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
        let stmt = if crate::pg::catalog::has_stripes() {
            &NEAR_S
        } else {
            &NEAR
        };
        spi::run(client, stmt, &[t.into(), guc::default_plan().into()])
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

/// The caller's JWT subject and its ancestors, nearest first (NULL without a JWT subject): what
/// row level security lets a member read of quota.usage, its own windows and its
/// organization's. A chain that cannot be followed (a cycle written by hand) gives the subject
/// alone.
#[pg_extern(stable, parallel_restricted)]
fn own_chain() -> Option<Vec<String>> {
    let req = request::request_info().ok()?;
    let sub = req.sub?;
    let _owner = AsOwner::enter();
    Some(Spi::connect_mut(|client| {
        super::cache::prepare();
        match super::chain::ancestors(client, &sub, req.parent.as_deref()) {
            Ok(chain) => chain.into_iter().map(|l| l.subject).collect(),
            Err(_) => vec![sub.clone()],
        }
    }))
}
