//! Idempotency keys: the first answer under a key is stored with the windows it charged, and
//! replayed to every later call with that key.

use super::charge::ts;
use super::decision::{Decision, Window};
use super::Request;
use crate::pg::error::{QuotaError, Result};
use crate::pg::spi::{self, Stmt};
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;
use serde_json::json;

/// Claim an idempotency key. A concurrent holder of the same key makes this wait until it
/// commits (then the key is taken) or rolls back (then it is ours).
pub(super) static KEY_CLAIM: Stmt = Stmt {
    sql: "INSERT INTO quota.idempotency_keys (subject, key) VALUES ($1, $2)
          ON CONFLICT (subject, key) DO NOTHING RETURNING true",
    args: &[T::TEXTOID, T::TEXTOID],
};

static KEY_GET: Stmt = Stmt {
    sql: "
SELECT k.response -> 'request', d.allowed AND NOT k.response ? 'refund', d.subject, d.metric,
       d.period, d.used, d.quota_limit, d.remaining, d.reset_at, d.retry_after_seconds,
       k.response -> 'decision' ->> 'binding_subject'
  FROM quota.idempotency_keys AS k,
       LATERAL pg_catalog.jsonb_populate_record(NULL::quota.decision, k.response -> 'decision') AS d
 WHERE k.subject = $1 AND k.key = $2",
    args: &[T::TEXTOID, T::TEXTOID],
};

pub(super) static KEY_SET: Stmt = Stmt {
    sql: "UPDATE quota.idempotency_keys SET response = $3 WHERE subject = $1 AND key = $2",
    args: &[T::TEXTOID, T::TEXTOID, T::JSONBOID],
};

/// Replay of an idempotency key: the first decision, or 22023 when the key was used for
/// something else. A grant that was refunded since no longer stands: its replay is not
/// allowed (so a key a subject claimed and refunded first cannot hand a service that uses the
/// same key later a grant that charged nothing).
pub(super) fn replay(client: &mut SpiClient<'_>, req: &Request<'_>, key: &str) -> Result<Decision> {
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
        // A decision stored before 0.8.0 has none: it was the subject's own window.
        binding_subject: spi::get::<String>(&row, 11).or_else(|| spi::get::<String>(&row, 3)),
    })
}

/// A window as kept in an idempotency key's response: what a refund of that grant gives back to.
pub(super) fn window_json(w: &Window) -> serde_json::Value {
    json!({"subject": w.subject, "period": w.period, "start": w.start, "reset_at": w.reset_at, "limit": w.limit, "used": w.used})
}

/// A window kept by window_json; one kept before 0.8.0 names no subject: it was `subject`'s.
pub(super) fn window_from_json(v: &serde_json::Value, subject: &str) -> Option<Window> {
    Some(Window {
        subject: v
            .get("subject")
            .and_then(|s| s.as_str())
            .unwrap_or(subject)
            .to_string(),
        period: v.get("period")?.as_str()?.to_string(),
        start: v.get("start")?.as_i64()?,
        reset_at: v.get("reset_at").and_then(|r| r.as_i64()),
        limit: v.get("limit")?.as_i64()?,
        used: v.get("used").and_then(|u| u.as_i64()).unwrap_or(0),
    })
}

/// Keep the decision under the request's idempotency key, with the windows a grant charged
/// (`charged`), which an untrusted refund of that grant gives back to.
pub(super) fn store_key(client: &mut SpiClient<'_>, req: &Request<'_>, d: &Decision, charged: &[Window]) {
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
