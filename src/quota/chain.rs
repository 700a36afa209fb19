//! Pooled quotas: a subject's chain of parents (quota.subjects.parent, or for the caller's own
//! subject the JWT claim quota_ext.parent_claim names) and the limits each level of the chain
//! has for a metric. A charge applies every level's limits at once (charge.rs).

use super::cache::{self, Subject, SubjectLimits};
use crate::pg::error::{QuotaError, Result};
use pgrx::spi::SpiClient;
use std::rc::Rc;

/// Most subjects in a chain: a subject and up to three ancestors.
pub const MAX_DEPTH: usize = 4;

/// One subject of a chain and its row of quota.subjects.
pub struct Link {
    pub subject: String,
    pub info: Rc<Subject>,
}

/// `subject` and its ancestors, nearest first. `parent_claim`: the parent the caller's JWT
/// names, when the caller acts as `subject`; it counts only when quota.subjects gives `subject`
/// no parent (and set_parent did not detach it) and names a subject of quota.subjects. set_parent keeps the table free of cycles
/// and of chains too deep, but rows written by hand or a claim can still make one: refused here.
pub fn ancestors(client: &mut SpiClient<'_>, subject: &str, parent_claim: Option<&str>) -> Result<Vec<Link>> {
    let mut chain: Vec<Link> = Vec::with_capacity(1);
    let mut next = Some(subject.to_string());
    while let Some(s) = next {
        if chain.iter().any(|l| l.subject == s) {
            return Err(QuotaError::ParentCycle {
                subject: chain.last().map(|l| l.subject.clone()).unwrap_or_default(),
                parent: s,
            });
        }
        if chain.len() == MAX_DEPTH {
            return Err(QuotaError::ChainTooDeep {
                subject: subject.to_string(),
                parent: s,
                depth: MAX_DEPTH + 1,
            });
        }
        let info = cache::subject(client, &s);
        next = info.parent.clone();
        if chain.is_empty() && next.is_none() && !info.detached {
            next = parent_claim
                .filter(|c| *c != s && cache::subject(client, c).exists)
                .map(str::to_string);
        }
        chain.push(Link { subject: s, info });
    }
    Ok(chain)
}

/// One level of a chain that limits the metric.
pub struct Level {
    pub subject: String,
    pub limits: SubjectLimits,
}

/// What applies to a charge of `metric` by `subject`: the subject's plan, and each level of its
/// chain that has a limit for the metric (a level without one is skipped). No level with a
/// limit at all: 42704, as for a subject alone. `plan_claim` and `parent_claim` are the
/// caller's JWT claims when it acts as `subject`.
pub fn levels(
    client: &mut SpiClient<'_>,
    subject: &str,
    metric: &str,
    plan_claim: Option<&str>,
    parent_claim: Option<&str>,
) -> Result<(String, Vec<Level>)> {
    cache::prepare();
    let default_plan = crate::pg::guc::default_plan_str();
    let chain = ancestors(client, subject, parent_claim)?;
    let mut own_plan = String::new();
    let mut levels = Vec::with_capacity(chain.len());
    for (i, link) in chain.into_iter().enumerate() {
        let claim = if i == 0 { plan_claim } else { None };
        let limits = cache::level_limits(client, &link.info, metric, &default_plan, claim);
        if i == 0 {
            own_plan = limits.plan.clone();
        }
        if !limits.periods.is_empty() {
            levels.push(Level {
                subject: link.subject,
                limits,
            });
        }
    }
    if levels.is_empty() {
        return Err(QuotaError::NoLimit {
            subject: subject.into(),
            metric: metric.into(),
            plan: own_plan,
        });
    }
    Ok((own_plan, levels))
}
