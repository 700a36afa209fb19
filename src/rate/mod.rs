//! Rate limits: GCRA token buckets in shared memory.
//!
//! A bucket is one word of state, its theoretical arrival time (TAT, nanoseconds on the
//! monotonic clock): the moment it would be full again. The table is an open-addressing hash table split into PARTITIONS
//! partitions, each with its own LWLock. A check takes its partition's lock in shared mode and
//! updates the TAT with a compare-and-swap, so checks on different keys never wait for each
//! other and checks on one key never take an exclusive lock; only inserting, evicting and
//! resetting a bucket take the partition exclusively. Nothing that can raise an ERROR runs
//! while a lock is held: only hashing-free arithmetic and memory reads and writes.
//!
//! Keys are identified by a 128-bit xxh3 hash plus their length. Sized by
//! quota_ext.rate_max_keys (postmaster); state is not transactional (like a sequence) and
//! starts empty after a restart or a crash.

pub mod policy;

use crate::metrics::{self, Counter};
use crate::pg::error::{OrRaise, QuotaError};
use crate::request;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::borrow::Cow;

mod answer;
pub mod gcra;
mod headers;
pub mod table;
use answer::check_rate_key;
use answer::decision_row;
use answer::RateDecision;
use gcra::now_ns;
use gcra::Gcra;
use table::check;
use table::require_ready;
use table::Kind;

/// The bucket a policy call uses and the limits that apply to it.
struct Resolved<'a> {
    key: Cow<'a, str>,
    policy: crate::rate::policy::Policy,
}

/// Plan and key of the caller for `policy`: the one plan rule (quota.subjects, else the JWT
/// claim app_metadata.plan when it names a plan, else quota_ext.default_plan); callers without
/// a JWT subject are plan `anonymous` keyed by `ip:<client address>` (request::client_ip). The warm path allocates only
/// the key of a caller that does not name one.
fn resolve<'a>(
    policy_name: &str,
    key: Option<&'a str>,
    trusted: bool,
) -> Result<Option<Resolved<'a>>, QuotaError> {
    let policies = crate::rate::policy::policy(policy_name);
    if policies.is_empty() {
        return Ok(None);
    }
    let req = request::request_info()?;
    let default_plan = crate::pg::guc::default_plan_str();
    let caller_plan;
    let plan: &str = match &req.sub {
        Some(sub) => {
            caller_plan = crate::quota::cache::caller_plan(sub, req.plan.as_deref(), &default_plan);
            &caller_plan
        }
        None => "anonymous",
    };
    let own_key = || -> Cow<'a, str> {
        match &req.sub {
            Some(sub) => Cow::Owned(sub.to_string()),
            None => Cow::Owned(format!(
                "ip:{}",
                request::client_ip().as_deref().unwrap_or("unknown")
            )),
        }
    };
    let key = match key {
        None => own_key(),
        Some(k) if trusted || *k == *own_key() => Cow::Borrowed(check_rate_key(Some(k))?),
        Some(k) => {
            return Err(QuotaError::OtherSubject {
                requested: k.to_string(),
            })
        }
    };
    let mut policy = policies
        .get(plan)
        .or_else(|| policies.get(&*default_plan))
        .copied()
        .ok_or_else(|| QuotaError::NoPolicy {
            policy: policy_name.to_string(),
            plan: plan.to_string(),
        })?;
    let mut key = key;
    // A pooled policy: the caller's own bucket is its parent's, with the parent's limits (one
    // bucket per organization, whichever member spends it). Untrusted callers cannot name their
    // own key to get out of it: the own key is pooled however it is given.
    // The policy is pooled when the caller's row or its parent's plan's row says so.
    if policies.values().any(|p| p.pooled) {
        if let Some(sub) = req.sub.as_deref().filter(|s| *key == **s) {
            if let Some(parent) = crate::quota::cache::caller_parent(sub, req.parent.as_deref()) {
                let parent_plan = crate::quota::cache::caller_plan(&parent, None, &default_plan);
                let parents = policies.get(&parent_plan).copied();
                if policy.pooled || parents.is_some_and(|p| p.pooled) {
                    policy = parents.unwrap_or(policy);
                    key = Cow::Owned(parent);
                }
            }
        }
    }
    Ok(Some(Resolved { key, policy }))
}

/// Longest bucket name formed on the stack (policy, separator, key); longer ones (a key from a
/// very long JWT subject) go to the heap.
const BUCKET_ON_STACK: usize = 640;

/// Check and take `cost` from the caller's bucket of the policy (a shadow policy never denies).
fn take(policy_name: &str, r: &Resolved<'_>, cost: i64) -> Gcra {
    let len = policy_name.len() + 1 + r.key.len();
    let mut stack = [0u8; BUCKET_ON_STACK];
    let mut heap = Vec::new();
    let bucket: &mut [u8] = if len <= BUCKET_ON_STACK {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    bucket[..policy_name.len()].copy_from_slice(policy_name.as_bytes());
    bucket[policy_name.len()] = 0x1f;
    bucket[policy_name.len() + 1..].copy_from_slice(r.key.as_bytes());
    let bucket: &[u8] = bucket;
    let p = &r.policy;
    let mut g = check(bucket, Kind::Policy, p.t_ns, p.burst, cost, now_ns());
    metrics::count(Counter::RateChecks);
    if !g.allowed {
        if p.shadow {
            // A shadow policy counts what it would deny, and allows.
            metrics::count(Counter::ShadowDenials);
            g = Gcra {
                allowed: true,
                retry_after_ns: Some(0),
                ..g
            };
        } else {
            metrics::count(Counter::RateDenials);
        }
    }
    g
}

fn limit(fcinfo: pg_sys::FunctionCallInfo, policy_name: &str, r: Resolved<'_>, cost: i64) -> RateDecision {
    let g = take(policy_name, &r, cost);
    decision_row(fcinfo, &r.key, r.policy.burst, &g)
}

/// Rate-limit the caller by a policy of quota.rate_policies, per plan (see resolve()). `key`
/// NULL means the caller's own: its JWT subject, or `ip:<address>` when anonymous. Its SQL
/// (policy and subject look-ups on a cold cache) runs under a pinned search_path; the warm path
/// runs none.
/// PARALLEL RESTRICTED, as every function that reads the request settings: a parallel
/// worker gets their values but not how they were set (transaction or session).
#[pg_extern(volatile, parallel_restricted)]
fn rate_limit(
    policy: Option<&str>,
    key: default!(Option<&str>, "NULL"),
    cost: default!(Option<i64>, 1),
    fcinfo: pg_sys::FunctionCallInfo,
) -> RateDecision {
    require_ready();
    let policy = request::check_name(
        "policy",
        policy,
        "Pass a policy of quota.rate_policies, e.g. 'default'.",
    )
    .or_raise();
    let cost = answer::check_cost(cost).or_raise();
    let r = resolve(policy, key, request::is_trusted())
        .and_then(|r| {
            r.ok_or(QuotaError::NoPolicy {
                policy: policy.to_string(),
                plan: "any".into(),
            })
        })
        .or_raise();
    limit(fcinfo, policy, r, cost)
}

/// The decision for the current PostgREST request (used by quota.pre_request()): policy `read`
/// for GET and HEAD, `write` otherwise, falling back to `default`. NULL for trusted callers and
/// when no such policy exists.
#[pg_extern(volatile, parallel_restricted)]
fn request_rate_decision(method: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> Option<RateDecision> {
    let (policy, r) = request_policy(method)?;
    Some(limit(fcinfo, policy, r, 1))
}

/// The policy and bucket of the caller's request: `read` for GET and HEAD, `write` otherwise,
/// falling back to `default`; None for trusted callers and when no such policy exists.
fn request_policy(method: Option<&str>) -> Option<(&'static str, Resolved<'static>)> {
    require_ready();
    if request::is_trusted() {
        return None;
    }
    let first = match method.unwrap_or("GET").to_ascii_uppercase().as_str() {
        "GET" | "HEAD" => "read",
        _ => "write",
    };
    [first, "default"]
        .into_iter()
        .find_map(|policy| resolve(policy, None, false).or_raise().map(|r| (policy, r)))
}

/// Rate-limit the caller's PostgREST request, for quota.pre_request: sets `response.headers`
/// for this transaction (the rate-limit headers, see headers.rs) and returns NULL, or for a
/// denial the PGRST error's message and detail, which make PostgREST answer 429. NULL and no
/// headers for trusted callers and when no policy applies.
#[pg_extern(volatile, parallel_restricted)]
fn request_rate_limit(method: Option<&str>) -> Option<Vec<String>> {
    let (policy, r) = request_policy(method)?;
    let g = take(policy, &r, 1);
    let answer = headers::answer(policy, &r, &g);
    headers::set_response_headers(&answer.headers);
    answer.denial.map(|(message, detail)| vec![message, detail])
}
