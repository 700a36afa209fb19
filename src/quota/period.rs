//! The calendar periods a limit can have, in order from the shortest.

use crate::pg::error::{QuotaError, Result};

pub const PERIODS: [&str; 7] = ["minute", "hour", "day", "week", "month", "year", "total"];

pub fn check_period(p: Option<&str>) -> Result<String> {
    let p = p.ok_or(QuotaError::NullArgument {
        what: "period",
        hint: "Periods are minute, hour, day, week, month, year and total.",
    })?;
    if PERIODS.contains(&p) {
        Ok(p.to_string())
    } else {
        Err(QuotaError::UnknownPeriod(p.to_string()))
    }
}

/// Position of a period from the shortest (unknown periods last).
pub fn rank(p: &str) -> usize {
    PERIODS.iter().position(|x| *x == p).unwrap_or(usize::MAX)
}
