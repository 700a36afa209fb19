//! Durable quotas: check-and-increment per subject, metric and calendar window, all periods of a
//! metric at once, exact under any concurrency, committed or rolled back with the caller.
//!
//! Exactness comes from the row lock of `INSERT ... ON CONFLICT DO UPDATE ... WHERE`: at READ
//! COMMITTED a session that waited for the row re-checks the limit against the row's newest
//! version, so the sum granted never passes the limit.

pub mod cache;
pub mod chain;
pub mod decision;
pub mod hot;
pub mod period;

use crate::metrics::{self, Counter};
use crate::pg::error::{OrRaise, QuotaError, Result};
use crate::pg::guc;
use crate::pg::spi::{self};
use crate::request::{self, AsOwner};
use decision::{Decision, Window};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::json;

mod admin;
mod charge;
mod idempotency;
mod refund;
mod status;
mod stripes;
use charge::audit_decision;
use charge::charge;
use charge::load_limits;
use charge::peek;
use charge::PlanWindows;
use idempotency::replay;
use idempotency::store_key;
use idempotency::KEY_CLAIM;
use refund::refund_current;
use refund::refund_grant;

pub(super) fn check_metric(metric: Option<&str>) -> Result<&str> {
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

pub(super) struct Request<'a> {
    action: Action,
    subject: &'a str,
    metric: &'a str,
    amount: i64,
    key: Option<&'a str>,
    /// The caller is trusted (may refund anything).
    trusted: bool,
    /// The plan the caller's JWT claims (app_metadata.plan), when it acts as its own subject.
    claim: Option<&'a str>,
    /// The parent the caller's JWT names (quota_ext.parent_claim), when it acts as its own
    /// subject.
    parent_claim: Option<&'a str>,
    /// A denial is about to be raised (require): its audit row goes to the audit writer, as the
    /// raise will roll back the caller's transaction.
    queue_denial: bool,
}

impl Request<'_> {
    fn json(&self) -> serde_json::Value {
        json!({"action": self.action.name(), "metric": self.metric, "amount": self.amount})
    }
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
    let mut pw: PlanWindows = load_limits(client, req)?;
    let outcome = match req.action {
        Action::Refund => refund_current(client, req, &mut pw.windows),
        Action::Consume if req.amount == 0 => {
            let d = peek(client, req, &mut pw.windows);
            store_key(client, req, &d, &[]);
            return Ok(d);
        }
        Action::Consume => charge(client, req, &mut pw)?,
    };
    let decision = outcome.decision;
    metrics::count(match (req.action, decision.allowed) {
        (Action::Refund, _) => Counter::Refunds,
        (Action::Consume, true) => Counter::Consumes,
        (Action::Consume, false) => Counter::Denials,
    });
    if guc::audit_wanted(decision.allowed) && !(outcome.audited && decision.allowed) {
        audit_decision(client, req, &pw, &decision, outcome.reason);
    }
    let charged: &[Window] = if req.action == Action::Consume && decision.allowed {
        &pw.windows
    } else {
        &[]
    };
    store_key(client, req, &decision, charged);
    Ok(decision)
}

/// The JWT claims app_metadata.plan and quota_ext.parent_claim, when the call acts on the
/// JWT's own subject (a trusted caller acting for someone else does not lend that subject its
/// own claims). Claims that do not parse claim nothing: an untrusted caller was refused for them
/// already (it needs its subject from them), and a trusted one naming a subject does not need
/// them.
pub(super) fn own_claims(subject: &str) -> (Option<String>, Option<String>) {
    match request::request_info() {
        Ok(req) if req.sub.as_deref() == Some(subject) => (req.plan, req.parent),
        _ => (None, None),
    }
}

fn run_request(
    action: Action,
    subject: Option<&str>,
    metric: Option<&str>,
    amount: Option<i64>,
    idempotency_key: Option<&str>,
    queue_denial: bool,
) -> Result<Decision> {
    let _timer = crate::latency::Timer::start(match (action, queue_denial) {
        (Action::Refund, _) => crate::latency::Func::Refund,
        (Action::Consume, true) => crate::latency::Func::Require,
        (Action::Consume, false) => crate::latency::Func::Consume,
    });
    crate::audit::writer::relaunch_stranded();
    let metric = check_metric(metric)?;
    let amount = check_amount(amount)?;
    let key = check_idempotency_key(idempotency_key)?;
    let subject = request::resolve_subject(subject)?;
    let trusted = request::is_trusted();
    let (claim, parent_claim) = own_claims(&subject);
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
                parent_claim: parent_claim.as_deref(),
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
