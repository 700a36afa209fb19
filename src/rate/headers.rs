//! The HTTP answer of a rate check for quota.pre_request: the rate-limit headers of every
//! answer and, for a denial, the error PostgREST turns into HTTP 429.

use super::gcra::Gcra;
use super::Resolved;
use crate::pg::guc::{self, RateLimitHeaders};
use serde_json::{json, Map, Value};

/// The headers PostgREST 12 exposes to browsers by itself (Access-Control-Expose-Headers). A
/// response that names its own list replaces PostgREST's, so the list repeats them.
const POSTGREST_EXPOSED: &str =
    "Content-Encoding, Content-Location, Content-Range, Content-Type, Date, Location, Server, Transfer-Encoding, Range-Unit";

const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Seconds, rounded up: a client that waits this long finds the bucket as announced.
fn ceil_secs(ns: i64) -> i64 {
    (ns.max(0) + 999_999_999) / 1_000_000_000
}

/// The answer as JSON: `headers` (one object per header, as PostgREST's response.headers
/// wants them), and for a denial `message` and `detail` (the PGRST error's texts).
pub(super) fn answer(policy: &str, r: &Resolved<'_>, g: &Gcra) -> Value {
    let burst = r.policy.burst;
    let reset = ceil_secs(g.reset_after_ns);
    let mut fields: Vec<(&str, String)> = Vec::with_capacity(8);
    let kind = guc::RATE_LIMIT_HEADERS.get();
    if kind != RateLimitHeaders::Legacy {
        // draft-ietf-httpapi-ratelimit-headers-11: the policy's quota `q` over a window of `w`
        // seconds (the time an empty bucket takes to fill), and what remains `r` and in how
        // many seconds `t` the bucket is full again.
        let window = ceil_secs(r.policy.t_ns.saturating_mul(burst));
        fields.push(("RateLimit-Policy", format!("\"{policy}\";q={burst};w={window}")));
        fields.push(("RateLimit", format!("\"{policy}\";r={};t={reset}", g.remaining)));
    }
    if kind != RateLimitHeaders::Draft {
        let now = crate::quota::decision::now_micros() / 1_000_000 + PG_EPOCH_UNIX_SECS;
        fields.push(("RateLimit-Limit", burst.to_string()));
        fields.push(("RateLimit-Remaining", g.remaining.to_string()));
        fields.push(("RateLimit-Reset", reset.to_string()));
        fields.push(("X-RateLimit-Limit", burst.to_string()));
        fields.push(("X-RateLimit-Remaining", g.remaining.to_string()));
        fields.push(("X-RateLimit-Reset", (now + reset).to_string()));
    }
    let retry_after = g.retry_after_ns.map(ceil_secs);
    let mut exposed = String::from(POSTGREST_EXPOSED);
    for (name, _) in &fields {
        exposed.push_str(", ");
        exposed.push_str(name);
    }
    exposed.push_str(", Retry-After");
    fields.push(("Access-Control-Expose-Headers", exposed));

    let headers: Vec<Value> = fields.iter().map(|(n, v)| json!({ *n: v })).collect();
    if g.allowed {
        return json!({ "allowed": true, "headers": headers });
    }
    let mut denial: Map<String, Value> = fields
        .into_iter()
        .map(|(n, v)| (n.to_string(), Value::from(v)))
        .collect();
    // A cost above the burst can never pass: Retry-After says an hour, the hint says why.
    denial.insert(
        "Retry-After".into(),
        Value::from(retry_after.unwrap_or(3600).to_string()),
    );
    let hint = match retry_after {
        Some(s) => format!("Retry after {s} seconds."),
        None => "The request costs more than the limit allows.".into(),
    };
    let message = json!({
        "code": "PT429",
        "message": "Too Many Requests",
        "details": format!("rate limit of {burst} reached for {}", r.key),
        "hint": hint,
    });
    let detail = json!({ "status": 429, "status_text": "Too Many Requests", "headers": denial });
    json!({
        "allowed": false,
        "headers": headers,
        "message": message.to_string(),
        "detail": detail.to_string(),
    })
}
