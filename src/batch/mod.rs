//! Inventory batches: quantities taken under row locks (`SELECT ... FOR UPDATE`), a version
//! bumped on every change for optimistic checks, and all-or-nothing consumption across an
//! owner's batches, earliest expiry first.

use crate::audit;
use crate::audit::refusal::{self, Refusal};
use crate::pg::error::{QuotaError, Result};
use crate::pg::guc;
use crate::pg::spi::{self, Stmt};
use crate::request::{self, AsOwner};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;
use serde_json::json;

fn check_quantity(what: &'static str, q: Option<i64>) -> Result<i64> {
    let q = q.ok_or(QuotaError::NullArgument {
        what,
        hint: "Pass a positive quantity.",
    })?;
    if q <= 0 {
        return Err(QuotaError::NotPositive { what, value: q });
    }
    Ok(q)
}

/// The owner an untrusted caller may act for is its JWT subject.
fn check_owner(owner: &str) -> Result<()> {
    if request::is_trusted() {
        return Ok(());
    }
    let me = request::jwt_subject()?.ok_or(QuotaError::NoJwtSubject)?;
    if me != owner {
        return Err(QuotaError::OtherSubject {
            requested: owner.to_string(),
        });
    }
    Ok(())
}

static CREATE: Stmt = Stmt {
    sql: "INSERT INTO quota.batches AS b (owner, item, quantity, initial_quantity, expires_at, metadata)
          VALUES ($1, $2, $3, $3, $4, coalesce($5, '{}'))
          RETURNING b",
    args: &[T::TEXTOID, T::TEXTOID, T::INT8OID, T::TIMESTAMPTZOID, T::JSONBOID],
};

/// Create a batch of `quantity` units of `item` owned by `owner` (trusted callers only).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn create_batch(
    owner: Option<&str>,
    item: Option<&str>,
    quantity: Option<i64>,
    expires_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    metadata: default!(Option<pgrx::JsonB>, "'{}'"),
) -> std::result::Result<pgrx::composite_type!('static, "quota.batches"), ErrorReport> {
    Ok(insert_batch(owner, item, quantity, expires_at, metadata)?)
}

/// create_batch's checks and insert.
fn insert_batch(
    owner: Option<&str>,
    item: Option<&str>,
    quantity: Option<i64>,
    expires_at: Option<TimestampWithTimeZone>,
    metadata: Option<pgrx::JsonB>,
) -> Result<pgrx::composite_type!('static, "quota.batches")> {
    request::require_trusted("quota.create_batch")?;
    let owner = request::check_name("owner", owner, "Pass the owner of the batch.")?;
    let item = request::check_name("item", item, "Pass the item the batch holds.")?;
    let q = quantity.ok_or(QuotaError::NullArgument {
        what: "quantity",
        hint: "Pass the batch's quantity.",
    })?;
    if q < 0 {
        return Err(QuotaError::Negative {
            what: "quantity",
            value: q,
        });
    }
    let _owner = AsOwner::enter();
    Ok(Spi::connect_mut(|client| {
        let row = spi::run(
            client,
            &CREATE,
            &[
                owner.into(),
                item.into(),
                q.into(),
                expires_at.into(),
                metadata.into(),
            ],
        )
        .next()
        .expect("INSERT RETURNING gives one row");
        let batch = spi::get::<pgrx::composite_type!('static, "quota.batches")>(&row, 1).expect("the row");
        if guc::audit_wanted(true) {
            audit::record(
                client,
                audit::Entry {
                    subject: Some(&owner),
                    action: "create_batch",
                    metric: Some(&item),
                    amount: Some(q),
                    success: true,
                    reason: "admin",
                    details: json!({"quantity": q}),
                    idempotency_key: None,
                },
            );
        }
        batch
    }))
}

/// The whole consumption in one statement. The UPDATE takes the same row lock SELECT ... FOR
/// UPDATE would, and at READ COMMITTED a caller that waited for it re-checks the condition
/// against the newest version of the row, so concurrent callers never take more than there is.
/// The audit row (when wanted) is written by the same statement.
static CONSUME_ONE: Stmt = Stmt {
    sql: "
WITH b AS (
    UPDATE quota.batches AS b SET quantity = b.quantity - $2, version = b.version + 1
     WHERE b.id = $1 AND b.quantity >= $2
       AND ($3::bigint IS NULL OR b.version = $3)
       AND ($4::text IS NULL OR b.owner = $4)
    RETURNING b.id, b.owner, b.item, b.quantity, b.version),
a AS (
    INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details, actor)
    SELECT b.owner, 'consume_batch', b.item, $2, true, 'consumed',
           ($5 || b.quantity::text || ',\"version_before\":' || (b.version - 1)::text
               || ',\"version_after\":' || b.version::text || '}')::jsonb,
           $7
      FROM b WHERE $6)
SELECT quantity, version FROM b",
    args: &[
        T::UUIDOID,
        T::INT8OID,
        T::INT8OID,
        T::TEXTOID,
        T::TEXTOID,
        T::BOOLOID,
        T::TEXTOID,
    ],
};

/// CONSUME_ONE on the tables of a version before 0.6.0 (see catalog::audit_has_actor).
static CONSUME_ONE_0_5: Stmt = Stmt {
    sql: "
WITH b AS (
    UPDATE quota.batches AS b SET quantity = b.quantity - $2, version = b.version + 1
     WHERE b.id = $1 AND b.quantity >= $2
       AND ($3::bigint IS NULL OR b.version = $3)
       AND ($4::text IS NULL OR b.owner = $4)
    RETURNING b.id, b.owner, b.item, b.quantity, b.version),
a AS (
    INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details)
    SELECT b.owner, 'consume_batch', b.item, $2, true, 'consumed',
           ($5 || b.quantity::text || ',\"version_before\":' || (b.version - 1)::text
               || ',\"version_after\":' || b.version::text || '}')::jsonb
      FROM b WHERE $6)
SELECT quantity, version FROM b",
    args: CONSUME_ONE.args,
};

/// Why a consumption was refused: read after the fact, which is sound because a batch's quantity
/// only falls, its version only rises and its owner never changes.
/// Ids are unique per owner only (the key is (id, owner)): the caller's own batch first.
static DIAGNOSE: Stmt = Stmt {
    sql: "SELECT owner, quantity, version, item FROM quota.batches WHERE id = $1
           ORDER BY owner IS NOT DISTINCT FROM $2 DESC LIMIT 1",
    args: &[T::UUIDOID, T::TEXTOID],
};

static TAKE: Stmt = Stmt {
    sql: "UPDATE quota.batches AS b SET quantity = b.quantity - t.take, version = b.version + 1
            FROM unnest($1::uuid[], $2::bigint[]) AS t(id, take)
           WHERE b.id = t.id AND b.owner = $3
       RETURNING b.id, b.quantity, b.version",
    args: &[T::UUIDARRAYOID, T::INT8ARRAYOID, T::TEXTOID],
};

fn take(
    client: &mut SpiClient<'_>,
    owner: &str,
    takes: &[(pgrx::Uuid, i64)],
) -> Vec<(pgrx::Uuid, i64, i64, i64)> {
    let ids: Vec<pgrx::Uuid> = takes.iter().map(|t| t.0).collect();
    let amounts: Vec<i64> = takes.iter().map(|t| t.1).collect();
    let rows: Vec<(pgrx::Uuid, i64, i64)> =
        spi::run(client, &TAKE, &[ids.into(), amounts.into(), owner.into()])
            .map(|r| {
                (
                    spi::get::<pgrx::Uuid>(&r, 1).expect("id"),
                    spi::get::<i64>(&r, 2).expect("quantity"),
                    spi::get::<i64>(&r, 3).expect("version"),
                )
            })
            .collect();
    // In the order taken (FEFO), not the order UPDATE happened to return them.
    takes
        .iter()
        .map(|(id, n)| {
            let (_, remaining, version) = rows.iter().find(|r| r.0 == *id).expect("each batch updated");
            (*id, *n, *remaining, *version)
        })
        .collect()
}

/// Count a refusal (the counters outlive the error that aborts the transaction) and pass it on.
fn refuse(e: QuotaError) -> QuotaError {
    crate::metrics::count_refusal(&e);
    e
}

/// Take `p_quantity_to_consume` units from one batch. With `p_expected_version`, a batch that
/// changed since the caller read it is refused (optimistic locking); without, the row lock
/// alone serializes concurrent callers.
///
/// In SQL this is quota.take_batch_quantity; quota.consume_batch_quantity (finalize.sql) calls
/// it, and gives a PostgREST request its refusals with an HTTP status of their own.
#[pg_extern(name = "take_batch_quantity", volatile, parallel_unsafe)]
fn consume_batch_quantity(
    p_batch_id: Option<pgrx::Uuid>,
    p_quantity_to_consume: Option<i64>,
    p_expected_version: default!(Option<i64>, "NULL"),
) -> std::result::Result<
    TableIterator<
        'static,
        (
            name!(batch_id, pgrx::Uuid),
            name!(consumed, i64),
            name!(remaining, i64),
            name!(version, i64),
        ),
    >,
    ErrorReport,
> {
    let _timer = crate::latency::Timer::start(crate::latency::Func::ConsumeBatchQuantity);
    crate::audit::writer::relaunch_stranded();
    let row = take_batch(p_batch_id, p_quantity_to_consume, p_expected_version)?;
    Ok(TableIterator::once(row))
}

/// consume_batch_quantity's checks, consumption and refusal diagnosis: (id, consumed,
/// remaining, version).
fn take_batch(
    p_batch_id: Option<pgrx::Uuid>,
    p_quantity_to_consume: Option<i64>,
    p_expected_version: Option<i64>,
) -> Result<(pgrx::Uuid, i64, i64, i64)> {
    let id = p_batch_id.ok_or(QuotaError::NullArgument {
        what: "p_batch_id",
        hint: "Pass the batch's id.",
    })?;
    let q = check_quantity("p_quantity_to_consume", p_quantity_to_consume)?;
    let me = if request::is_trusted() {
        None
    } else {
        Some(request::jwt_subject()?.ok_or(QuotaError::NoJwtSubject)?)
    };
    // Details but for the members the statement appends.
    let mut prefix = json!({"batch_id": id.to_string(), "consumed": q}).to_string();
    prefix.pop();
    prefix.push_str(",\"remaining\":");
    let _owner = AsOwner::enter();
    Spi::connect_mut(|client| {
        let args = [
            id.into(),
            q.into(),
            p_expected_version.into(),
            me.as_deref().into(),
            prefix.as_str().into(),
            guc::audit_wanted(true).into(),
            request::actor().into(),
        ];
        let stmt = if crate::pg::catalog::audit_has_actor() {
            &CONSUME_ONE
        } else {
            &CONSUME_ONE_0_5
        };
        let rows: Vec<(i64, i64)> = spi::run(client, stmt, &args)
            .map(|r| {
                (
                    spi::get::<i64>(&r, 1).expect("quantity"),
                    spi::get::<i64>(&r, 2).expect("version"),
                )
            })
            .collect();
        match rows[..] {
            [(remaining, version)] => {
                crate::metrics::count_batch_consume();
                return Ok((id, q, remaining, version));
            }
            // A trusted caller names no owner, and ids are unique per owner only: raising rolls
            // back what the statement did to each of them.
            [_, _, ..] => {
                return Err(QuotaError::AmbiguousBatch {
                    batch: id.to_string(),
                    owners: rows.len(),
                })
            }
            [] => {}
        }
        Err(why_refused(client, id, q, me.as_deref(), p_expected_version))
    })
}

/// Queue the audit row of a refused consume_batch_quantity.
fn batch_refusal(
    subject: Option<&str>,
    item: Option<&str>,
    q: i64,
    reason: &str,
    details: serde_json::Value,
) {
    refusal::refusal(Refusal {
        subject,
        action: "consume_batch",
        metric: item,
        amount: Some(q),
        reason,
        details,
        idempotency_key: None,
    })
}

/// Why the consumption was refused, read after the fact (see DIAGNOSE), with its audit row
/// queued (the error rolls the caller's transaction back).
fn why_refused(
    client: &mut pgrx::spi::SpiClient<'_>,
    id: pgrx::Uuid,
    q: i64,
    me: Option<&str>,
    expected_version: Option<i64>,
) -> QuotaError {
    let refusal = |subject, item, reason, details| batch_refusal(subject, item, q, reason, details);
    let Some(r) = spi::run(client, &DIAGNOSE, &[id.into(), me.into()]).next() else {
        refusal(
            me,
            None,
            "unknown_batch",
            json!({"batch_id": id.to_string(), "requested": q}),
        );
        return QuotaError::UnknownBatch(id.to_string());
    };
    let owner = spi::get::<String>(&r, 1).expect("owner");
    let (quantity, version) = (
        spi::get::<i64>(&r, 2).expect("quantity"),
        spi::get::<i64>(&r, 3).expect("version"),
    );
    let item = spi::get::<String>(&r, 4).expect("item");
    if let Some(me) = me.filter(|me| *me != owner) {
        // Recorded under the caller, without the batch's owner or contents.
        refusal(
            Some(me),
            None,
            "not_owner",
            json!({"batch_id": id.to_string(), "requested": q}),
        );
        return QuotaError::NotBatchOwner {
            batch: id.to_string(),
        };
    }
    if let Some(expected) = expected_version.filter(|e| *e != version) {
        refusal(
            Some(&owner),
            Some(&item),
            "version_conflict",
            json!({"batch_id": id.to_string(), "requested": q, "available": quantity,
                   "expected_version": expected, "version": version}),
        );
        return refuse(QuotaError::VersionConflict {
            id: id.to_string(),
            expected,
            actual: version,
        });
    }
    refusal(
        Some(&owner),
        Some(&item),
        "insufficient_quantity",
        json!({"batch_id": id.to_string(), "requested": q, "available": quantity,
               "expected_version": expected_version, "version": version}),
    );
    refuse(QuotaError::Insufficient {
        what: format!("batch {id}"),
        requested: q,
        available: quantity,
    })
}

static CANDIDATES: Stmt = Stmt {
    sql: "SELECT id FROM quota.batches
           WHERE owner = $1 AND item = $2 AND quantity > 0
             AND (expires_at IS NULL OR expires_at > pg_catalog.now())",
    args: &[T::TEXTOID, T::TEXTOID],
};

/// Lock in one global order (by id): callers whose batch sets overlap queue instead of
/// deadlocking. The rows' current values are read after the lock, so the caller re-checks them.
static LOCK_MANY: Stmt = Stmt {
    sql: "SELECT id, quantity, expires_at, created_at FROM quota.batches
           WHERE id = ANY ($1) AND owner = $2 ORDER BY id FOR UPDATE",
    args: &[T::UUIDARRAYOID, T::TEXTOID],
};

/// Take `quantity` units of `item` across `owner`'s unexpired batches, earliest expiry first
/// (batches without expiry last, then oldest first), or oldest first with strategy 'fifo'.
/// All or nothing.
#[pg_extern(volatile, parallel_unsafe)]
fn consume_item(
    owner: Option<&str>,
    item: Option<&str>,
    quantity: Option<i64>,
    strategy: default!(Option<&str>, "'fefo'"),
) -> std::result::Result<
    TableIterator<
        'static,
        (
            name!(batch_id, pgrx::Uuid),
            name!(consumed, i64),
            name!(remaining, i64),
            name!(version, i64),
        ),
    >,
    ErrorReport,
> {
    let _timer = crate::latency::Timer::start(crate::latency::Func::ConsumeItem);
    crate::audit::writer::relaunch_stranded();
    let rows = take_item(owner, item, quantity, strategy)?;
    Ok(TableIterator::new(rows))
}

/// A batch of the owner's item, locked, with what the order of consumption needs.
struct LockedBatch {
    id: pgrx::Uuid,
    quantity: i64,
    expires_at: Option<i64>,
    created_at: i64,
}

/// The owner's batches of the item that still hold something and have not expired, locked (in
/// one global order, see LOCK_MANY) and then put in the order they are taken: earliest expiry
/// first (no expiry last, then oldest), or oldest first for fifo. Expired or emptied while the
/// lock was awaited: skipped.
fn lock_in_order(
    client: &mut pgrx::spi::SpiClient<'_>,
    owner: &str,
    item: &str,
    fifo: bool,
) -> Vec<LockedBatch> {
    let ids: Vec<pgrx::Uuid> = spi::run(client, &CANDIDATES, &[owner.into(), item.into()])
        .map(|r| spi::get::<pgrx::Uuid>(&r, 1).expect("id"))
        .collect();
    let now = crate::pg::now_micros();
    let mut locked: Vec<LockedBatch> = spi::run(client, &LOCK_MANY, &[ids.into(), owner.into()])
        .map(|r| LockedBatch {
            id: spi::get::<pgrx::Uuid>(&r, 1).expect("id"),
            quantity: spi::get::<i64>(&r, 2).expect("quantity"),
            expires_at: spi::get::<TimestampWithTimeZone>(&r, 3).map(|t| t.into_inner()),
            created_at: spi::get::<TimestampWithTimeZone>(&r, 4)
                .expect("created_at")
                .into_inner(),
        })
        .filter(|b| b.quantity > 0 && b.expires_at.is_none_or(|e| e > now))
        .collect();
    if fifo {
        locked.sort_by_key(|b| (b.created_at, *b.id.as_bytes()));
    } else {
        locked.sort_by_key(|b| {
            (
                b.expires_at.is_none(),
                b.expires_at,
                b.created_at,
                *b.id.as_bytes(),
            )
        });
    }
    locked
}

/// consume_item's checks and consumption: one (id, consumed, remaining, version) per batch.
fn take_item(
    owner: Option<&str>,
    item: Option<&str>,
    quantity: Option<i64>,
    strategy: Option<&str>,
) -> Result<Vec<(pgrx::Uuid, i64, i64, i64)>> {
    let owner = request::check_name("owner", owner, "Pass the owner whose batches to take from.")?;
    let item = request::check_name("item", item, "Pass the item to take.")?;
    let q = check_quantity("quantity", quantity)?;
    let fifo = match strategy.unwrap_or("fefo") {
        "fefo" => false,
        "fifo" => true,
        other => return Err(QuotaError::UnknownStrategy(other.to_string())),
    };
    check_owner(&owner)?;
    let _owner = AsOwner::enter();
    Spi::connect_mut(|client| {
        let locked = lock_in_order(client, owner, item, fifo);
        let available: i64 = locked
            .iter()
            .map(|b| b.quantity)
            .fold(0i64, |a, b| a.saturating_add(b));
        if available < q {
            return Err(item_short(owner, item, q, fifo, available, locked.len()));
        }
        let done = take(client, owner, &takes_in_order(&locked, q));
        crate::metrics::count_batch_consume();
        if guc::audit_wanted(true) {
            audit_item_taken(client, owner, item, q, fifo, &done);
        }
        Ok(done)
    })
}

/// How much each batch gives, in order, until `q` is reached (the batches hold at least `q`).
fn takes_in_order(locked: &[LockedBatch], q: i64) -> Vec<(pgrx::Uuid, i64)> {
    let mut left = q;
    let mut takes = Vec::new();
    for b in locked {
        if left == 0 {
            break;
        }
        let n = left.min(b.quantity);
        takes.push((b.id, n));
        left -= n;
    }
    takes
}

fn strategy_name(fifo: bool) -> &'static str {
    if fifo {
        "fifo"
    } else {
        "fefo"
    }
}

/// The refusal of an item the owner's batches hold too little of, its audit row queued.
fn item_short(owner: &str, item: &str, q: i64, fifo: bool, available: i64, batches: usize) -> QuotaError {
    refusal::refusal(Refusal {
        subject: Some(owner),
        action: "consume_item",
        metric: Some(item),
        amount: Some(q),
        reason: "insufficient_quantity",
        details: json!({
            "strategy": strategy_name(fifo),
            "requested": q,
            "available": available,
            "batches": batches,
        }),
        idempotency_key: None,
    });
    refuse(QuotaError::Insufficient {
        what: format!("item \"{item}\" of owner \"{owner}\""),
        requested: q,
        available,
    })
}

fn audit_item_taken(
    client: &mut pgrx::spi::SpiClient<'_>,
    owner: &str,
    item: &str,
    q: i64,
    fifo: bool,
    done: &[(pgrx::Uuid, i64, i64, i64)],
) {
    audit::record(
        client,
        audit::Entry {
            subject: Some(owner),
            action: "consume_item",
            metric: Some(item),
            amount: Some(q),
            success: true,
            reason: "consumed",
            details: json!({
                "strategy": strategy_name(fifo),
                "batches": done.iter().map(|(id, n, rem, ver)| json!({
                    "batch_id": id.to_string(),
                    "consumed": n,
                    "remaining": rem,
                    "version_before": ver - 1,
                    "version_after": ver,
                })).collect::<Vec<_>>(),
            }),
            idempotency_key: None,
        },
    );
}
