//! Reading usage: `status` (one subject's windows) and `near_limit` (who is close to a limit).

use super::charge::ts;
use super::decision::{Decision, DecisionRow, Window};
use super::own_plan_claim;
use crate::pg::error::{OrRaise, QuotaError};
use crate::pg::guc;
use crate::pg::spi::{self, Stmt};
use crate::request::{self, AsOwner};
use pgrx::prelude::*;
use pgrx::PgBuiltInOids as T;

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
