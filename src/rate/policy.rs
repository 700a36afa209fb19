//! Rate-limit policies: the rows of quota.rate_policies, validated into the numbers GCRA
//! needs, and each backend's cache of them, dropped with the other caches (cache::generation).

use crate::pg::error::QuotaError;
use crate::pg::spi::{self, Stmt};
use crate::quota::cache;
use pgrx::prelude::*;
use pgrx::PgBuiltInOids as T;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

thread_local! {
    /// (the cache generation it was filled under, policy -> plan -> limits); an empty map for a
    /// policy: no such policy.
    static POLICIES: RefCell<(u64, HashMap<String, Rc<HashMap<String, Policy>>>)> =
        RefCell::new((0, HashMap::new()));
}

#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub t_ns: i64,
    pub burst: i64,
    pub shadow: bool,
    /// One bucket per organization: a caller with a parent spends its parent's bucket.
    pub pooled: bool,
}

static POLICY_LOAD: Stmt = Stmt {
    sql: "SELECT plan, rate, per, burst, shadow, pooled FROM quota.rate_policies WHERE policy = $1",
    args: &[T::TEXTOID],
};

/// POLICY_LOAD on the tables of a version before 0.8.0 (no pooled policies; see
/// catalog::Shape).
static POLICY_LOAD_0_7: Stmt = Stmt {
    sql: "SELECT plan, rate, per, burst, shadow, false FROM quota.rate_policies WHERE policy = $1",
    args: &[T::TEXTOID],
};

/// A policy's limits per plan, from the backend cache (no SQL when warm).
pub fn policy(name: &str) -> Rc<HashMap<String, Policy>> {
    cache::follow_committed_changes();
    let gen = cache::generation();
    let hit = POLICIES.with(|p| {
        let mut p = p.borrow_mut();
        if p.0 != gen {
            *p = (gen, HashMap::new());
        }
        p.1.get(name).cloned()
    });
    if let Some(hit) = hit {
        return hit;
    }
    cache::watch_tables();
    let _owner = crate::request::AsOwner::enter();
    let map: HashMap<String, Policy> = Spi::connect_mut(|client| {
        let load = if crate::pg::catalog::shape().policies_pooled {
            &POLICY_LOAD
        } else {
            &POLICY_LOAD_0_7
        };
        spi::run(client, load, &[name.into()])
            .map(|r| {
                let plan = spi::get::<String>(&r, 1).expect("plan");
                let (t_ns, burst) = rate_params(
                    spi::get::<i64>(&r, 2),
                    spi::get::<Interval>(&r, 3),
                    spi::get::<i64>(&r, 4),
                )
                .unwrap_or_else(|e| pgrx::error!("quota.rate_policies ({name}, {plan}): {e}"));
                (
                    plan,
                    Policy {
                        t_ns,
                        burst,
                        shadow: spi::get::<bool>(&r, 5).unwrap_or(false),
                        pooled: spi::get::<bool>(&r, 6).unwrap_or(false),
                    },
                )
            })
            .collect()
    });
    let map = Rc::new(map);
    // Kept only if no invalidation came while the query ran (it may concern a commit the
    // query's snapshot did not see).
    if cache::generation() == gen {
        cache::note_fill();
        POLICIES.with(|p| {
            let mut p = p.borrow_mut();
            if p.1.len() >= 1_000 {
                p.1.clear();
            }
            p.1.insert(name.to_string(), map.clone());
        });
    }
    map
}

/// Validated numbers of a rate: emission interval `t` (ns per token) and bucket size.
pub fn rate_params(
    rate: Option<i64>,
    per: Option<Interval>,
    burst: Option<i64>,
) -> Result<(i64, i64), QuotaError> {
    let rate = rate.ok_or(QuotaError::NullArgument {
        what: "rate",
        hint: "Pass how many tokens refill per interval.",
    })?;
    if rate <= 0 {
        return Err(QuotaError::NotPositive {
            what: "rate",
            value: rate,
        });
    }
    let per = per.ok_or(QuotaError::NullArgument {
        what: "per",
        hint: "Pass an interval such as '1 second'.",
    })?;
    let per_ns = interval_ns(&per);
    if per_ns <= 0 {
        return Err(QuotaError::BadInterval {
            what: "per",
            value: format!("{per}"),
        });
    }
    let burst = burst.unwrap_or(rate);
    if burst <= 0 {
        return Err(QuotaError::NotPositive {
            what: "burst",
            value: burst,
        });
    }
    let t = match i64::try_from(per_ns) {
        Ok(p) => (p / rate) as i128, // the common case, without a 128-bit division
        Err(_) => per_ns / rate as i128,
    };
    if t == 0 || t > i64::MAX as i128 / (burst as i128).max(1) {
        return Err(QuotaError::OutOfRange {
            what: "rate per interval",
            value: rate as f64,
            min: 1.0,
            max: per_ns as f64,
        });
    }
    Ok((t as i64, burst))
}

/// Nanoseconds in an interval, months counted as 30 days (as PostgreSQL's interval arithmetic
/// does when it must compare them).
pub fn interval_ns(i: &Interval) -> i128 {
    (i.months() as i128 * 30 + i.days() as i128) * 86_400_000_000_000 + i.micros() as i128 * 1000
}
