//! Refunds: of a grant named by its idempotency key (what an untrusted caller may do), and of
//! the current windows (trusted callers).

use super::charge::apply_returned;
use super::charge::details_json;
use super::charge::Outcome;
use super::charge::Returned;
use super::decision::{least_remaining, Decision, Window};
use super::idempotency::window_from_json;
use super::idempotency::window_json;
use super::idempotency::KEY_SET;
use super::Request;
use crate::audit;
use crate::audit::refusal::{self, Refusal};
use crate::metrics::{self, Counter};
use crate::pg::error::{QuotaError, Result};
use crate::pg::guc;
use crate::pg::spi::{self, Stmt};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgBuiltInOids as T;
use serde_json::json;

/// One window given back. One statement per window, run in the windows' lock order (subject,
/// then period): an UPDATE joining several windows locks them in whatever order its plan reads
/// them (a merge join on the window index, seen with four periods), which could deadlock with a
/// consume locking them in period order.
static REFUND_ONE: Stmt = Stmt {
    sql: "
UPDATE quota.usage AS u SET used = greatest(u.used - $3, 0)
 WHERE u.subject = $1 AND u.metric = $2 AND u.period = $4 AND u.window_start = $5
RETURNING u.period, u.used",
    args: &[T::TEXTOID, T::TEXTOID, T::INT8OID, T::TEXTOID, T::TIMESTAMPTZOID],
};

/// Give `req.amount` back to each window, in the order given (lock order).
fn give_back_windows(client: &mut SpiClient<'_>, req: &Request<'_>, ws: &[&Window]) -> Vec<Returned> {
    let mut out = Vec::with_capacity(ws.len());
    if crate::pg::catalog::has_stripes() {
        // A window's usage may sit in its stripes (hot windows, 0.10.0).
        for w in ws {
            if let Some(used) = super::stripes::refund_window(client, req.metric, req.amount, w) {
                out.push((w.subject.clone(), w.period.clone(), used));
            }
        }
        return out;
    }
    for w in ws {
        let start = TimestampWithTimeZone::try_from(w.start).expect("window start");
        let rows = spi::run(
            client,
            &REFUND_ONE,
            &[
                w.subject.as_str().into(),
                req.metric.into(),
                req.amount.into(),
                w.period.as_str().into(),
                start.into(),
            ],
        );
        for row in rows {
            if let (Some(p), Some(used)) = (spi::get::<String>(&row, 1), spi::get::<i64>(&row, 2)) {
                out.push((w.subject.clone(), p, used));
            }
        }
    }
    out
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
pub(super) fn refund_grant(client: &mut SpiClient<'_>, req: &Request<'_>) -> Result<Decision> {
    let refused = |why: &'static str| {
        refusal::refusal(Refusal {
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

/// The windows kept in a key's response; those of a grant made before 0.8.0 are the subject's.
fn windows_in(v: &serde_json::Value, subject: &str) -> Vec<Window> {
    v.as_array()
        .map(|a| a.iter().filter_map(|w| window_from_json(w, subject)).collect())
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
        let ws = windows_in(&first["windows"], req.subject);
        if first["amount"].as_i64() != Some(req.amount) || ws.is_empty() {
            return Refundable::No("that grant was refunded already");
        }
        return Refundable::Refunded(ws);
    }
    if req.amount > granted {
        return Refundable::No("a refund may not exceed the grant");
    }
    let ws = windows_in(&response["windows"], req.subject);
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
    super::charge::window_order(&mut ws);
    let refs: Vec<&Window> = ws.iter().collect();
    let rows = give_back_windows(client, req, &refs);
    apply_returned(rows, &mut ws);
    let d = Decision::from_window(subject, metric, least_remaining(&ws), true, false);
    metrics::count(Counter::Refunds);
    if guc::audit_wanted(true) {
        let binding = ws
            .iter()
            .find(|w| Some(&w.period) == d.period.as_ref() && Some(&w.subject) == d.binding_subject.as_ref())
            .unwrap_or(&ws[0]);
        let mut levels: Vec<(String, String)> = Vec::new();
        for w in &ws {
            if !levels.iter().any(|(s, _)| *s == w.subject) {
                levels.push((w.subject.clone(), String::new()));
            }
        }
        let mut details = details_json(subject, "", &levels, binding, &ws);
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

/// A trusted refund: usage given back in the current windows, never below 0 (windows without a
/// row have nothing to give back: used stays 0).
pub(super) fn refund_current(client: &mut SpiClient<'_>, req: &Request<'_>, ws: &mut [Window]) -> Outcome {
    if req.amount > 0 {
        let refs: Vec<&Window> = ws.iter().collect();
        let rows = give_back_windows(client, req, &refs);
        apply_returned(rows, ws);
    }
    Outcome {
        decision: Decision::from_window(req.subject, req.metric, least_remaining(ws), true, false),
        reason: "refunded",
        audited: false,
    }
}
