//! The trusted callers' functions that change the configuration: plans, limits, overrides, and
//! resetting usage.

use super::cache;
use super::check_metric;
use super::period::check_period;
use crate::audit;
use crate::pg::error::{QuotaError, Result};
use crate::pg::spi::{self, Stmt};
use crate::request::{self, AsOwner};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;
use serde_json::json;

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
        cache::note_change(&[c"subjects"]);
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
        cache::note_change(&[c"limits"]);
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
        cache::note_change(&[c"overrides"]);
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

/// The subject's rows locked first, in the order a consume locks them (metric, then period from
/// the shortest), so that a reset and consumes of the subject or of its members cannot deadlock;
/// the DELETE then finds them locked by this call already, whatever order it reads them in.
static RESET_LOCK: Stmt = Stmt {
    sql: "
SELECT FROM quota.usage AS u WHERE u.subject = $1 AND ($2::text IS NULL OR u.metric = $2)
 ORDER BY u.metric,
          pg_catalog.array_position('{minute,hour,day,week,month,year,total}'::text[], u.period),
          u.window_start
   FOR UPDATE",
    args: &[T::TEXTOID, T::TEXTOID],
};

static RESET: Stmt = Stmt {
    sql: "DELETE FROM quota.usage WHERE subject = $1 AND ($2::text IS NULL OR metric = $2)",
    args: &[T::TEXTOID, T::TEXTOID],
};

/// RESET where windows may be hot (0.10.0): the usage rows, then the stripes (after the rows,
/// so that a reset waits for a window's loader, which holds the row, before it touches a stripe
/// the loader's caller is about to write), each window's deleted usage returned.
static RESET_ROWS: Stmt = Stmt {
    sql: "DELETE FROM quota.usage WHERE subject = $1 AND ($2::text IS NULL OR metric = $2)
          RETURNING metric, period, window_start, used",
    args: &[T::TEXTOID, T::TEXTOID],
};
static RESET_STRIPES: Stmt = Stmt {
    sql: "DELETE FROM quota.usage_stripes WHERE subject = $1 AND ($2::text IS NULL OR metric = $2)
          RETURNING metric, period, window_start, used",
    args: &[T::TEXTOID, T::TEXTOID],
};

/// Delete the usage rows and stripes of the subject; a hot window's count goes down by what
/// was deleted when this transaction commits. Returns the number of usage rows deleted.
fn reset_striped(client: &mut pgrx::spi::SpiClient<'_>, subject: &str, metric: Option<&str>) -> i64 {
    let mut deleted: Vec<(String, String, i64, i64)> = Vec::new();
    let mut rows = 0;
    for (stmt, is_row) in [(&RESET_ROWS, true), (&RESET_STRIPES, false)] {
        for r in spi::run(client, stmt, &[subject.into(), metric.into()]) {
            rows += is_row as i64;
            let key = (
                spi::get::<String>(&r, 1).expect("metric"),
                spi::get::<String>(&r, 2).expect("period"),
                spi::get::<TimestampWithTimeZone>(&r, 3)
                    .expect("window_start")
                    .into_inner(),
            );
            let used = spi::get::<i64>(&r, 4).unwrap_or(0);
            match deleted
                .iter_mut()
                .find(|d| (&d.0, &d.1, d.2) == (&key.0, &key.1, key.2))
            {
                Some(d) => d.3 += used,
                None => deleted.push((key.0, key.1, key.2, used)),
            }
        }
    }
    for (metric, period, start, used) in deleted {
        if let Some(k) = super::hot::key(subject, &metric, &period, start) {
            super::hot::decrease_at_commit(k, used);
            if super::hot::is_hot(k) {
                // Every window with stripes has a usage row (see stripes::STRIPES).
                let start =
                    TimestampWithTimeZone::try_from(start).expect("window start read from PostgreSQL");
                spi::run(
                    client,
                    &RESET_KEEP_ROW,
                    &[
                        subject.into(),
                        metric.as_str().into(),
                        period.as_str().into(),
                        start.into(),
                    ],
                );
            }
        }
    }
    rows
}

static RESET_KEEP_ROW: Stmt = Stmt {
    sql: "INSERT INTO quota.usage (subject, metric, period, window_start, used) VALUES ($1, $2, $3, $4, 0)
              ON CONFLICT (subject, metric, period, window_start) DO NOTHING",
    args: &[T::TEXTOID, T::TEXTOID, T::TEXTOID, T::TIMESTAMPTZOID],
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
        spi::run(client, &RESET_LOCK, &[subject.into(), metric.into()]);
        let n = if crate::pg::catalog::has_stripes() {
            reset_striped(client, &subject, metric)
        } else {
            spi::run(client, &RESET, &[subject.into(), metric.into()]).len() as i64
        };
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

// ---------------------------------------------------------------------------------------------
// Pooled quotas: parents

/// set_parent calls queue here, so two of them cannot each see the other's chain as it was and
/// together make a cycle; charges are not held up (they only read quota.subjects).
static LOCK_SUBJECTS: Stmt = Stmt {
    sql: "LOCK TABLE quota.subjects IN SHARE ROW EXCLUSIVE MODE",
    args: &[],
};

static SUBJECT_PARENT: Stmt = Stmt {
    sql: "SELECT parent FROM quota.subjects WHERE subject = $1",
    args: &[T::TEXTOID],
};

/// The chain from $1 up, nearest first (bounded: rows written by hand may hold a cycle).
static UP: Stmt = Stmt {
    sql: "
WITH RECURSIVE up(subject, depth) AS (
    SELECT $1::text, 1
    UNION ALL
    SELECT s.parent, up.depth + 1
      FROM up JOIN quota.subjects AS s ON s.subject = up.subject
     WHERE s.parent IS NOT NULL AND up.depth < 16)
SELECT subject FROM up ORDER BY depth",
    args: &[T::TEXTOID],
};

/// How many levels $1 and the subjects below it take: 1 for a subject without children.
static HEIGHT: Stmt = Stmt {
    sql: "
WITH RECURSIVE down(subject, depth) AS (
    SELECT $1::text, 1
    UNION ALL
    SELECT s.subject, down.depth + 1
      FROM down JOIN quota.subjects AS s ON s.parent = down.subject
     WHERE down.depth < 16)
SELECT max(depth)::bigint FROM down",
    args: &[T::TEXTOID],
};

static ATTACH: Stmt = Stmt {
    sql: "
INSERT INTO quota.subjects AS s (subject, plan, parent, detached) VALUES ($1, NULL, $2, false)
    ON CONFLICT (subject) DO UPDATE SET parent = excluded.parent, detached = false",
    args: &[T::TEXTOID, T::TEXTOID],
};

/// No parent, and none from a JWT claim either (the row remembers it: `detached`).
static DETACH: Stmt = Stmt {
    sql: "
INSERT INTO quota.subjects AS s (subject, plan, parent, detached) VALUES ($1, NULL, NULL, true)
    ON CONFLICT (subject) DO UPDATE SET parent = NULL, detached = true",
    args: &[T::TEXTOID],
};

/// Make `parent` the parent of `subject` (pooled quotas: charging the subject charges the
/// parent's windows too); NULL detaches. The parent must be a subject of quota.subjects; a
/// cycle is 42P19, a chain of more than four subjects 54000, and both change nothing. A subject
/// without a row gets one, without a plan of its own (it keeps following its JWT claim or
/// quota_ext.default_plan). Detaching also stops a parent claim (quota_ext.parent_claim) from
/// giving the subject a parent, until set_parent attaches it again.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn set_parent(subject: Option<&str>, parent: Option<&str>) -> std::result::Result<(), ErrorReport> {
    request::require_trusted("quota.set_parent")?;
    let subject = request::check_name("subject", subject, "Pass the subject to attach or detach.")?;
    if let Some(p) = parent {
        request::check_present("parent", p)?;
    }
    let _owner = AsOwner::enter();
    Spi::connect_mut(|client| -> Result<()> {
        spi::run(client, &LOCK_SUBJECTS, &[]);
        let previous = spi::run(client, &SUBJECT_PARENT, &[subject.into()])
            .next()
            .and_then(|row| spi::get::<String>(&row, 1));
        match parent {
            Some(p) => {
                check_chain(client, subject, p)?;
                spi::run(client, &ATTACH, &[subject.into(), p.into()]);
            }
            None => {
                spi::run(client, &DETACH, &[subject.into()]);
            }
        }
        cache::note_change(&[c"subjects"]);
        audit::admin(
            client,
            subject,
            "set_parent",
            None,
            json!({"parent": parent, "previous": previous}),
        );
        Ok(())
    })?;
    Ok(())
}

/// Whether `parent` may become the parent of `subject`: it exists, the chain makes no cycle and
/// is at most chain::MAX_DEPTH subjects deep from the bottom of `subject`'s own subtree.
fn check_chain(client: &mut SpiClient<'_>, subject: &str, parent: &str) -> Result<()> {
    let cycle = || QuotaError::ParentCycle {
        subject: subject.to_string(),
        parent: parent.to_string(),
    };
    if subject == parent {
        return Err(cycle());
    }
    if spi::run(client, &SUBJECT_PARENT, &[parent.into()]).is_empty() {
        return Err(QuotaError::UnknownParent(parent.to_string()));
    }
    let above: Vec<String> = spi::run(client, &UP, &[parent.into()])
        .filter_map(|row| spi::get::<String>(&row, 1))
        .collect();
    if above.iter().any(|s| s == subject) {
        return Err(cycle());
    }
    let height = spi::run(client, &HEIGHT, &[subject.into()])
        .next()
        .and_then(|row| spi::get::<i64>(&row, 1))
        .unwrap_or(1) as usize;
    if above.len() + height > super::chain::MAX_DEPTH {
        return Err(QuotaError::ChainTooDeep {
            subject: subject.to_string(),
            parent: parent.to_string(),
            depth: above.len() + height,
        });
    }
    Ok(())
}
