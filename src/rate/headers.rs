//! The HTTP answer of a rate check for quota.pre_request: the rate-limit headers of every
//! answer and, for a denial, the error PostgREST turns into HTTP 429.

use super::gcra::Gcra;
use super::Resolved;
use crate::pg::guc::{self, RateLimitHeaders};
use pgrx::pg_sys;
use std::ffi::CString;
use std::fmt::Write;

/// The headers PostgREST 12 exposes to browsers by itself (Access-Control-Expose-Headers). A
/// response that names its own list replaces PostgREST's, so the list repeats them.
const POSTGREST_EXPOSED: &str =
    "Content-Encoding, Content-Location, Content-Range, Content-Type, Date, Location, Server, Transfer-Encoding, Range-Unit";

const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Seconds, rounded up: a client that waits this long finds the bucket as announced.
fn ceil_secs(ns: i64) -> i64 {
    (ns.max(0) + 999_999_999) / 1_000_000_000
}

pub(super) struct Answer {
    /// PostgREST's `response.headers`: a JSON array of one-member objects.
    pub(super) headers: String,
    /// For a denial, the PGRST error's MESSAGE and DETAIL (JSON texts).
    pub(super) denial: Option<(String, String)>,
}

/// A JSON string (the policy name and the key are the only texts not of our own making).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

pub(super) fn answer(policy: &str, r: &Resolved<'_>, g: &Gcra) -> Answer {
    let burst = r.policy.burst;
    let reset = ceil_secs(g.reset_after_ns);
    let mut fields: Vec<(&str, String)> = Vec::with_capacity(9);
    let kind = guc::RATE_LIMIT_HEADERS.get();
    if kind != RateLimitHeaders::Legacy {
        // draft-ietf-httpapi-ratelimit-headers-11: the policy's quota `q` over a window of `w`
        // seconds (the time an empty bucket takes to fill), and what remains `r` and in how
        // many seconds `t` the bucket is full again. The policy name is a structured-field
        // string: quoted, its quotes and backslashes escaped.
        let name = policy.replace('\\', "\\\\").replace('"', "\\\"");
        let window = ceil_secs(r.policy.t_ns.saturating_mul(burst));
        fields.push(("RateLimit-Policy", format!("\"{name}\";q={burst};w={window}")));
        fields.push(("RateLimit", format!("\"{name}\";r={};t={reset}", g.remaining)));
    }
    if kind != RateLimitHeaders::Draft {
        let now = crate::pg::now_micros() / 1_000_000 + PG_EPOCH_UNIX_SECS;
        fields.push(("RateLimit-Limit", burst.to_string()));
        fields.push(("RateLimit-Remaining", g.remaining.to_string()));
        fields.push(("RateLimit-Reset", reset.to_string()));
        fields.push(("X-RateLimit-Limit", burst.to_string()));
        fields.push(("X-RateLimit-Remaining", g.remaining.to_string()));
        fields.push(("X-RateLimit-Reset", (now + reset).to_string()));
    }
    let mut exposed = String::from(POSTGREST_EXPOSED);
    for (name, _) in &fields {
        exposed.push_str(", ");
        exposed.push_str(name);
    }
    exposed.push_str(", Retry-After");
    fields.push(("Access-Control-Expose-Headers", exposed));

    let mut headers = String::with_capacity(640);
    headers.push('[');
    for (i, (name, value)) in fields.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(headers, "{sep}{{\"{name}\":{}}}", quoted(value));
    }
    headers.push(']');
    if g.allowed {
        return Answer {
            headers,
            denial: None,
        };
    }
    // A cost above the burst can never pass: Retry-After says an hour, the hint says why.
    let retry_after = g.retry_after_ns.map(ceil_secs);
    let mut denial_headers = format!("{{\"Retry-After\":\"{}\"", retry_after.unwrap_or(3600));
    for (name, value) in &fields {
        let _ = write!(denial_headers, ",\"{name}\":{}", quoted(value));
    }
    denial_headers.push('}');
    let hint = match retry_after {
        Some(s) => format!("Retry after {s} seconds."),
        None => "The request costs more than the limit allows.".into(),
    };
    let details = format!("rate limit of {burst} reached for {}", r.key);
    let message = format!(
        "{{\"code\":\"PT429\",\"message\":\"Too Many Requests\",\"details\":{},\"hint\":{}}}",
        quoted(&details),
        quoted(&hint)
    );
    let detail =
        format!("{{\"status\":429,\"status_text\":\"Too Many Requests\",\"headers\":{denial_headers}}}");
    Answer {
        headers,
        denial: Some((message, detail)),
    }
}

/// Set `response.headers` for the current transaction, as `set_config(..., true)` does.
pub(super) fn set_response_headers(headers: &str) {
    let value = CString::new(headers).expect("no NUL in JSON built here");
    // SAFETY: a placeholder setting any role may set, as set_config sets it; valid C strings.
    unsafe {
        pg_sys::set_config_option(
            c"response.headers".as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}
