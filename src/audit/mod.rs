//! quota.audit_log: one row per decision (subject to quota_ext.audit), keyset pages, pruning.

pub mod queue;
pub mod refusal;
pub mod writer;

use crate::pg::error::{OrRaise, QuotaError, Result};
use crate::pg::guc;
use crate::pg::spi::{self, Stmt};
use crate::request::{self, AsOwner};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;

static INSERT: Stmt = Stmt {
    sql: "INSERT INTO quota.audit_log
            (subject, action, metric, amount, success, reason, details, idempotency_key, actor)
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    args: &[
        T::TEXTOID,
        T::TEXTOID,
        T::TEXTOID,
        T::INT8OID,
        T::BOOLOID,
        T::TEXTOID,
        T::JSONBOID,
        T::TEXTOID,
        T::TEXTOID,
    ],
};

/// INSERT on the tables of a version before 0.6.0 (no column `actor`; see
/// catalog::audit_has_actor): the same parameters, the last one unused.
static INSERT_0_5: Stmt = Stmt {
    sql: "INSERT INTO quota.audit_log
            (subject, action, metric, amount, success, reason, details, idempotency_key)
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    args: INSERT.args,
};

pub struct Entry<'a> {
    pub subject: Option<&'a str>,
    pub action: &'a str,
    pub metric: Option<&'a str>,
    pub amount: Option<i64>,
    pub success: bool,
    pub reason: &'a str,
    pub details: serde_json::Value,
    pub idempotency_key: Option<&'a str>,
}

/// Write one audit row in the caller's transaction, with the acting role (request::actor).
/// The caller checks quota_ext.audit. A row that concerns no subject (None or '') has subject
/// '' (NULL on the tables of a version before 0.9.0, catalog::audit_no_subject).
pub fn record(client: &mut SpiClient<'_>, e: Entry<'_>) {
    let stmt = if crate::pg::catalog::audit_has_actor() {
        &INSERT
    } else {
        &INSERT_0_5
    };
    spi::run(
        client,
        stmt,
        &[
            e.subject
                .filter(|s| !s.is_empty())
                .or_else(|| crate::pg::catalog::audit_no_subject())
                .into(),
            e.action.into(),
            e.metric.into(),
            e.amount.into(),
            e.success.into(),
            e.reason.into(),
            pgrx::JsonB(e.details).into(),
            e.idempotency_key.into(),
            request::actor().into(),
        ],
    );
}

/// Audit an administrative change (always a success).
pub fn admin(
    client: &mut SpiClient<'_>,
    subject: &str,
    action: &str,
    metric: Option<&str>,
    details: serde_json::Value,
) {
    if guc::audit_wanted(true) {
        record(
            client,
            Entry {
                subject: Some(subject),
                action,
                metric,
                amount: None,
                success: true,
                reason: "admin",
                details,
                idempotency_key: None,
            },
        );
    }
}

pub type AuditRow = pgrx::composite_type!('static, "quota.audit_log");

static PAGE_SUBJECT: Stmt = Stmt {
    sql: "
SELECT a FROM quota.audit_log AS a
 WHERE a.subject = $1
   AND (a.created_at, a.id) < (coalesce((SELECT b.created_at FROM quota.audit_log AS b
                                          WHERE b.id = $2 AND b.subject = $1),
                                        CASE WHEN $2 IS NULL THEN 'infinity'::timestamptz END),
                               coalesce($2, 9223372036854775807))
 ORDER BY a.created_at DESC, a.id DESC
 LIMIT $3",
    args: &[T::TEXTOID, T::INT8OID, T::INT4OID],
};

static PAGE_ALL: Stmt = Stmt {
    sql: "SELECT a FROM quota.audit_log AS a WHERE a.id < coalesce($1, 9223372036854775807)
          ORDER BY a.id DESC LIMIT $2",
    args: &[T::INT8OID, T::INT4OID],
};

pub const MAX_PAGE: i32 = 1000;

/// Newest first. Pass the last id of a page as before_id for the next one. Untrusted callers see
/// only their own rows; trusted callers see one subject, or all when subject is NULL.
#[pg_extern(stable, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
fn audit_page(
    subject: default!(Option<&str>, "NULL"),
    before_id: default!(Option<i64>, "NULL"),
    page_size: default!(Option<i32>, 50),
) -> SetOfIterator<'static, pgrx::composite_type!('static, "quota.audit_log")> {
    let page = page_size.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&page) {
        QuotaError::OutOfRange {
            what: "page_size",
            value: page as f64,
            min: 1.0,
            max: MAX_PAGE as f64,
        }
        .raise();
    }
    let subject = if subject.is_none() && request::is_trusted() {
        None
    } else {
        Some(request::resolve_subject(subject).or_raise())
    };
    let _owner = AsOwner::enter();
    let rows: Vec<AuditRow> = Spi::connect_mut(|client| {
        let table = match &subject {
            Some(s) => spi::run(
                client,
                &PAGE_SUBJECT,
                &[s.as_str().into(), before_id.into(), page.into()],
            ),
            None => spi::run(client, &PAGE_ALL, &[before_id.into(), page.into()]),
        };
        table.filter_map(|row| spi::get::<AuditRow>(&row, 1)).collect()
    });
    SetOfIterator::new(rows)
}

static NEGATIVE: Stmt = Stmt {
    sql: "SELECT $1 < '0'::interval, $2 < '0'::interval, $3 < '0'::interval",
    args: &[T::INTERVALOID, T::INTERVALOID, T::INTERVALOID],
};
/// Usage rows of windows over for at least $1. A window's end is reckoned as its start plus two
/// periods, never before its real end whatever the time zone, daylight saving or month length
/// (a current window is never deleted); `total` windows never end. One range of
/// usage_period_window_idx per period.
static PRUNE_USAGE: Stmt = Stmt {
    sql: "
DELETE FROM quota.usage AS u
 USING unnest('{minute,hour,day,week,month,year}'::text[]) AS p(period)
 WHERE u.period = p.period
   AND u.window_start < pg_catalog.now() - $1 - pg_catalog.concat('2 ', p.period)::interval",
    args: &[T::INTERVALOID],
};
/// PRUNE_USAGE for the stripes of hot windows (0.10.0).
static PRUNE_STRIPES: Stmt = Stmt {
    sql: "
DELETE FROM quota.usage_stripes AS u
 USING unnest('{minute,hour,day,week,month,year}'::text[]) AS p(period)
 WHERE u.period = p.period
   AND u.window_start < pg_catalog.now() - $1 - pg_catalog.concat('2 ', p.period)::interval",
    args: &[T::INTERVALOID],
};
static PRUNE_AUDIT: Stmt = Stmt {
    sql: "DELETE FROM quota.audit_log WHERE created_at < pg_catalog.now() - $1",
    args: &[T::INTERVALOID],
};
static PRUNE_KEYS: Stmt = Stmt {
    sql: "DELETE FROM quota.idempotency_keys WHERE created_at < pg_catalog.now() - $1",
    args: &[T::INTERVALOID],
};

/// Delete audit rows and idempotency keys older than the given ages, and usage rows of windows
/// over for longer than `usage_older_than`. NULL keeps that kind (usage is kept by default).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn prune(
    audit_older_than: default!(Option<Interval>, "'90 days'"),
    idempotency_older_than: default!(Option<Interval>, "'7 days'"),
    usage_older_than: default!(Option<Interval>, "NULL"),
) -> std::result::Result<
    TableIterator<
        'static,
        (
            name!(audit_deleted, i64),
            name!(idempotency_deleted, i64),
            name!(usage_deleted, i64),
        ),
    >,
    ErrorReport,
> {
    request::require_trusted("quota.prune")?;
    let _owner = AsOwner::enter();
    let counts = Spi::connect_mut(|client| -> Result<(i64, i64, i64)> {
        let row = spi::run(
            client,
            &NEGATIVE,
            &[
                audit_older_than.into(),
                idempotency_older_than.into(),
                usage_older_than.into(),
            ],
        )
        .next()
        .expect("one row");
        for (n, what, v) in [
            (1, "audit_older_than", audit_older_than),
            (2, "idempotency_older_than", idempotency_older_than),
            (3, "usage_older_than", usage_older_than),
        ] {
            if spi::get::<bool>(&row, n).unwrap_or(false) {
                return Err(QuotaError::BadInterval {
                    what,
                    value: format!("{}", v.unwrap()),
                });
            }
        }
        let a = audit_older_than.map_or(0, |i| spi::run(client, &PRUNE_AUDIT, &[i.into()]).len() as i64);
        let k = idempotency_older_than.map_or(0, |i| spi::run(client, &PRUNE_KEYS, &[i.into()]).len() as i64);
        let u = usage_older_than.map_or(0, |i| {
            if crate::pg::catalog::has_stripes() {
                spi::run(client, &PRUNE_STRIPES, &[i.into()]);
            }
            spi::run(client, &PRUNE_USAGE, &[i.into()]).len() as i64
        });
        Ok((a, k, u))
    })?;
    Ok(TableIterator::once(counts))
}
