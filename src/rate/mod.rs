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
pub mod routes;

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
/// Whose bucket a policy call spends.
#[derive(Clone, Copy)]
enum KeyArg<'a> {
    /// The caller's own: its JWT subject, `ip:<address>` when anonymous.
    Own,
    /// A key the caller names (only its own, unless it is trusted).
    Named(&'a str),
    /// The client's address, signed in or not (a route keyed by `ip`).
    Ip,
}

fn resolve<'a>(
    policy_name: &str,
    key: KeyArg<'a>,
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
        KeyArg::Own => own_key(),
        KeyArg::Ip => Cow::Owned(format!(
            "ip:{}",
            request::client_ip().as_deref().unwrap_or("unknown")
        )),
        KeyArg::Named(k) if trusted || *k == *own_key() => Cow::Borrowed(check_rate_key(Some(k))?),
        KeyArg::Named(k) => {
            return Err(QuotaError::OtherSubject {
                requested: k.to_string(),
            })
        }
    };
    let policy = policies
        .get(plan)
        .or_else(|| policies.get(&*default_plan))
        .copied()
        .ok_or_else(|| QuotaError::NoPolicy {
            policy: policy_name.to_string(),
            plan: plan.to_string(),
        })?;
    let (key, policy) = pooled(&policies, &req, &default_plan, key, policy);
    Ok(Some(Resolved { key, policy }))
}

/// A pooled policy: the caller's own bucket is its parent's, with the parent's plan's limits
/// (one bucket per organization, whichever member spends it), when the caller's row or its
/// parent's plan's row of the policy is pooled. Untrusted callers cannot name their own key to
/// get out of it: the own key is pooled however it is given.
fn pooled<'a>(
    policies: &std::collections::HashMap<String, crate::rate::policy::Policy>,
    req: &request::RequestInfo,
    default_plan: &str,
    key: Cow<'a, str>,
    policy: crate::rate::policy::Policy,
) -> (Cow<'a, str>, crate::rate::policy::Policy) {
    if !policies.values().any(|p| p.pooled) {
        return (key, policy);
    }
    let Some(sub) = req.sub.as_deref().filter(|s| *key == **s) else {
        return (key, policy);
    };
    let Some(parent) = crate::quota::cache::caller_parent(sub, req.parent.as_deref()) else {
        return (key, policy);
    };
    let parent_plan = crate::quota::cache::caller_plan(&parent, None, default_plan);
    let parents = policies.get(&parent_plan).copied();
    if policy.pooled || parents.is_some_and(|p| p.pooled) {
        (Cow::Owned(parent), parents.unwrap_or(policy))
    } else {
        (key, policy)
    }
}

/// Longest bucket name formed on the stack (policy, separator, key); longer ones (a key from a
/// very long JWT subject) go to the heap.
const BUCKET_ON_STACK: usize = 640;

/// Run `f` on the bucket name of a policy call: `policy 0x1f key`, on the stack when short.
fn with_bucket<T>(policy_name: &str, key: &str, f: impl FnOnce(&[u8]) -> T) -> T {
    let len = policy_name.len() + 1 + key.len();
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
    bucket[policy_name.len() + 1..].copy_from_slice(key.as_bytes());
    f(bucket)
}

/// Check and take `cost` from the caller's bucket of the policy (a shadow policy never denies).
fn take(policy_name: &str, r: &Resolved<'_>, cost: i64) -> Gcra {
    with_bucket(policy_name, &r.key, |bucket| take_from(bucket, r, cost))
}

fn take_from(bucket: &[u8], r: &Resolved<'_>, cost: i64) -> Gcra {
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
    let _timer = crate::latency::Timer::start(crate::latency::Func::RateLimit);
    require_ready();
    let policy = request::check_name(
        "policy",
        policy,
        "Pass a policy of quota.rate_policies, e.g. 'default'.",
    )
    .or_raise();
    let cost = answer::check_cost(cost).or_raise();
    let key = match key {
        None => KeyArg::Own,
        Some(k) => KeyArg::Named(k),
    };
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

/// The decision for the current PostgREST request (used by quota.pre_request()): every
/// matching route of quota.rate_routes, all or nothing (see request_policies), the one reported
/// being the denying one or else the first. NULL for trusted callers and when no policy applies.
#[pg_extern(volatile, parallel_restricted)]
fn request_rate_decision(method: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> Option<RateDecision> {
    let list = request_policies(method);
    let (i, g) = take_all(&list)?;
    let (_, r) = &list[i];
    Some(decision_row(fcinfo, &r.key, r.policy.burst, &g))
}

/// The policies and buckets of the caller's request. With rows in quota.rate_routes that match
/// the method and `request.path`: each of them, in priority order, keyed by the caller or by its
/// address. Otherwise (or when no matching row names a policy that exists): `read` for GET and
/// HEAD, `write` otherwise, falling back to `default`. Nothing for trusted callers.
fn request_policies(method: Option<&str>) -> Vec<(Cow<'static, str>, Resolved<'static>)> {
    require_ready();
    if request::is_trusted() {
        return Vec::new();
    }
    let method = method.unwrap_or("GET").to_ascii_uppercase();
    let all = routes::routes();
    if !all.is_empty() {
        let path = request::request_path();
        let matched: Vec<(Cow<'static, str>, Resolved<'static>)> = all
            .iter()
            .filter(|route| route.matches(&method, &path))
            .filter_map(|route| {
                let key = match route.key_by {
                    routes::KeyBy::User => KeyArg::Own,
                    routes::KeyBy::Ip => KeyArg::Ip,
                };
                resolve(&route.policy, key, false)
                    .or_raise()
                    .map(|r| (Cow::Owned(route.policy.clone()), r))
            })
            .collect();
        if !matched.is_empty() {
            return matched;
        }
    }
    let first = match method.as_str() {
        "GET" | "HEAD" => "read",
        _ => "write",
    };
    [first, "default"]
        .into_iter()
        .find_map(|policy| {
            resolve(policy, KeyArg::Own, false)
                .or_raise()
                .map(|r| (Cow::Borrowed(policy), r))
        })
        .into_iter()
        .collect()
}

/// Take one token from every bucket of the list, all or nothing: at the first that denies, the
/// tokens the earlier ones gave are given back, so a denial spends nothing. Returns which
/// decision to report (the denying one, or else the first) and it; None for an empty list.
fn take_all(list: &[(Cow<'static, str>, Resolved<'static>)]) -> Option<(usize, Gcra)> {
    let mut taken: Vec<(usize, Gcra)> = Vec::with_capacity(list.len());
    for (i, (policy, r)) in list.iter().enumerate() {
        let g = take(policy, r, 1);
        if !g.allowed {
            for (j, gj) in &taken {
                if gj.new_tat.is_some() {
                    let (policy, r) = &list[*j];
                    with_bucket(policy, &r.key, |bucket| {
                        table::give_back(bucket, Kind::Policy, r.policy.t_ns)
                    });
                }
            }
            return Some((i, g));
        }
        taken.push((i, g));
    }
    taken.into_iter().next()
}

/// Rate-limit the caller's PostgREST request, for quota.pre_request: sets `response.headers`
/// for this transaction (the rate-limit headers of the decision reported, see headers.rs) and
/// returns NULL, or for a denial the PGRST error's message and detail, which make PostgREST
/// answer 429. NULL and no headers for trusted callers and when no policy applies.
#[pg_extern(volatile, parallel_restricted)]
fn request_rate_limit(method: Option<&str>) -> Option<Vec<String>> {
    let _timer = crate::latency::Timer::start(crate::latency::Func::PreRequest);
    let list = request_policies(method);
    let (i, g) = take_all(&list)?;
    let (policy, r) = &list[i];
    let answer = headers::answer(policy, r, &g);
    headers::set_response_headers(&answer.headers);
    answer.denial.map(|(message, detail)| vec![message, detail])
}
