//! The generic cell rate algorithm: one theoretical arrival time per bucket, compared with the
//! clock.

/// The GCRA answer for a bucket whose TAT is `tat` (nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gcra {
    pub allowed: bool,
    /// TAT to store when allowed (None: nothing changes).
    pub new_tat: Option<i64>,
    pub remaining: i64,
    pub reset_after_ns: i64,
    /// None when the cost can never pass (it exceeds the burst).
    pub retry_after_ns: Option<i64>,
}

/// Generic cell rate algorithm, as redis-cell's CL.THROTTLE: a bucket of `burst` tokens that
/// refills one token every `t` nanoseconds. `cost` 0 peeks. A denied call changes nothing.
pub fn gcra(tat: i64, now: i64, t: i64, burst: i64, cost: i64) -> Gcra {
    let (t128, limit) = (t as i128, t as i128 * burst as i128);
    let base = tat.max(now) as i128;
    let now128 = now as i128;
    // Whole tokens left at `tat`; the division in 64 bits when it fits (it nearly always does).
    let remaining_at = |tat: i128| {
        let room = limit - (tat - now128);
        match i64::try_from(room) {
            Ok(r) => (r / t).max(0),
            Err(_) => (room / t128).max(0) as i64,
        }
    };
    if cost > burst {
        return Gcra {
            allowed: false,
            new_tat: None,
            remaining: remaining_at(base),
            reset_after_ns: (base - now128) as i64,
            retry_after_ns: None,
        };
    }
    let new_tat = base + t128 * cost as i128;
    if new_tat - now128 > limit {
        return Gcra {
            allowed: false,
            new_tat: None,
            remaining: remaining_at(base),
            reset_after_ns: (base - now128) as i64,
            retry_after_ns: Some((new_tat - limit - now128) as i64),
        };
    }
    Gcra {
        allowed: true,
        new_tat: (cost > 0).then_some(new_tat.min(i64::MAX as i128) as i64),
        remaining: remaining_at(new_tat),
        reset_after_ns: (new_tat - now128) as i64,
        retry_after_ns: Some(0),
    }
}

/// The rate table's clock: pg::monotonic_ns.
pub fn now_ns() -> i64 {
    crate::pg::monotonic_ns()
}

#[cfg(test)]
mod unit {
    use super::gcra;
    const S: i64 = 1_000_000_000;

    #[test]
    fn exactly_burst_then_denied_then_refilled() {
        let t = S / 10; // 10 per second
        let (mut tat, now) = (0, 100 * S);
        for i in 0..5 {
            let g = gcra(tat, now, t, 5, 1);
            assert!(g.allowed, "call {i}");
            assert_eq!(g.remaining, 4 - i);
            tat = g.new_tat.unwrap();
        }
        let g = gcra(tat, now, t, 5, 1);
        assert!(!g.allowed);
        assert_eq!(g.retry_after_ns, Some(t));
        assert!(gcra(tat, now + t, t, 5, 1).allowed);
        assert!(!gcra(tat, now + t - 1, t, 5, 1).allowed);
        assert_eq!(gcra(tat, now, t, 5, 6).retry_after_ns, None);
        assert_eq!(gcra(tat, now, t, 5, 0).new_tat, None);
    }
}
