//! Who is calling, whom they may act for, and the switch to the extension owner for table access.
//!
//! Functions run as the caller (SECURITY INVOKER), so the caller's role is known when the trust
//! check runs. Only after the check do they switch to the extension owner, the same switch
//! SECURITY DEFINER makes, for the statements that touch quota.* tables; the switch also pins
//! the search path of those statements to pg_catalog (a plan-cache override, not a GUC change:
//! a function-level `SET search_path` recomputes the path on every call and every return).

use crate::pg::error::{QuotaError, Result};
use pgrx::pg_sys;

mod address;
mod owner;
mod settings;
mod trust;
pub use address::client_ip;
pub use owner::{actor, AsOwner};
use settings::same_text;
use settings::{CLAIMS, LEGACY_SUB, PATH};
use trust::forget_trust;
pub use trust::{is_trusted, require_trusted};

pub const MAX_NAME_BYTES: usize = 256;

pub fn init() {
    // SAFETY: registers callbacks for this process (inherited by backends when preloaded);
    // called once from _PG_init.
    unsafe {
        for cache in [
            pg_sys::SysCacheIdentifier::AUTHOID,
            pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
            pg_sys::SysCacheIdentifier::NAMESPACEOID,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(cache as i32, Some(forget_trust), pg_sys::Datum::from(0));
        }
    }
}

/// The caller's JWT subject: request.jwt.claims ->> 'sub', else a transaction-local
/// request.jwt.claim.sub. Longer than a subject may be: 22001, like a subject argument.
pub fn jwt_subject() -> Result<Option<String>> {
    Ok(request_info()?.sub)
}

fn check_jwt_subject(sub: Option<String>) -> Result<Option<String>> {
    match sub {
        Some(s) if s.len() > MAX_NAME_BYTES => Err(QuotaError::TooLong {
            what: "JWT subject",
            len: s.len(),
            max: MAX_NAME_BYTES,
        }),
        other => Ok(other),
    }
}

/// The path of the PostgREST request (`request.path`, e.g. `/rpc/consume`), '' when unset.
pub fn request_path() -> String {
    String::from_utf8_lossy(PATH.text()).into_owned()
}

/// Check a name-like argument (subject, metric, key): not NULL, not blank, at most 256 bytes.
pub fn check_name<'a>(what: &'static str, value: Option<&'a str>, hint: &'static str) -> Result<&'a str> {
    let v = value.ok_or(QuotaError::NullArgument { what, hint })?;
    check_present(what, v)?;
    Ok(v)
}

pub fn check_present(what: &'static str, v: &str) -> Result<()> {
    if v.trim().is_empty() {
        return Err(QuotaError::EmptyArgument { what });
    }
    if v.len() > MAX_NAME_BYTES {
        return Err(QuotaError::TooLong {
            what,
            len: v.len(),
            max: MAX_NAME_BYTES,
        });
    }
    Ok(())
}

/// The subject a call acts on. NULL means "me" (the JWT subject). Untrusted callers may only
/// name their own JWT subject.
pub fn resolve_subject(arg: Option<&str>) -> Result<String> {
    if let Some(s) = arg {
        check_present("subject", s)?;
    }
    if is_trusted() {
        return match arg {
            Some(s) => Ok(s.to_string()),
            None => jwt_subject()?.ok_or(QuotaError::NullArgument {
                what: "subject",
                hint:
                    "Pass a subject, or set request.jwt.claims with a \"sub\" claim to act as that subject.",
            }),
        };
    }
    let me = jwt_subject()?.ok_or(QuotaError::NoJwtSubject)?;
    match arg {
        Some(s) if s != me => Err(QuotaError::OtherSubject {
            requested: s.to_string(),
        }),
        _ => Ok(me),
    }
}

/// The parts of the JWT the quota and rate paths need, parsed once per distinct text of
/// request.jwt.claims and quota_ext.parent_claim (PostgREST sets the claims per request; a
/// pooled backend sees the same text many times in a row).
#[derive(Clone, Debug, Default)]
pub struct RequestInfo {
    pub sub: Option<String>,
    /// JWT claim app_metadata.plan.
    pub plan: Option<String>,
    /// The claim quota_ext.parent_claim names (a string or a number), if set and present.
    pub parent: Option<String>,
}

/// What one text of the claims said: (claims, parent_claim path, sub, plan, parent).
type ParsedClaims = (String, String, Option<String>, Option<String>, Option<String>);

thread_local! {
    static LAST_CLAIMS: std::cell::RefCell<ParsedClaims> =
        const { std::cell::RefCell::new((String::new(), String::new(), None, None, None)) };
    /// (request.headers, the address found, client_ip_header, trusted_proxy_hops)
    pub(super) static LAST_HEADERS: std::cell::RefCell<(String, Option<String>, String, usize)> =
        const { std::cell::RefCell::new((String::new(), None, String::new(), 0)) };
}

/// A claim that names a subject: a non-empty string, or a number as its text.
fn claim_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// The claim at a dotted path (`app_metadata.org_id`) of the claims.
fn claim_at<'v>(claims: &'v serde_json::Value, path: &str) -> Option<&'v serde_json::Value> {
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

fn parse_claims(claims: &str, parent_path: &str) -> Result<(Option<String>, Option<String>, Option<String>)> {
    if claims.trim().is_empty() {
        return Ok((None, None, None));
    }
    let v: serde_json::Value = serde_json::from_str(claims).map_err(|e| QuotaError::MalformedClaims {
        detail: e.to_string(),
    })?;
    let plan = v
        .pointer("/app_metadata/plan")
        .and_then(|p| p.as_str())
        .map(str::to_string);
    Ok((
        claim_text(v.get("sub")),
        plan,
        parent_claim(&v, parent_path.trim())?,
    ))
}

/// The parent a JWT names at quota_ext.parent_claim's path: absent (or null) names none; a
/// claim that is there but unusable is refused rather than ignored, since ignoring it would
/// charge the member alone, out of its organization's quota. A path under `user_metadata`
/// (which Supabase lets users edit themselves) is refused: a user could name any parent.
fn parent_claim(claims: &serde_json::Value, path: &str) -> Result<Option<String>> {
    if path.is_empty() {
        return Ok(None);
    }
    let bad = |why: &'static str| QuotaError::BadParentClaim {
        path: path.to_string(),
        why,
    };
    if path == "user_metadata" || path.starts_with("user_metadata.") {
        return Err(bad(
            "user_metadata is written by users themselves, so they could name any parent",
        ));
    }
    match claim_at(claims, path) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => Err(bad("it is empty")),
        Some(serde_json::Value::String(s)) if s.len() > MAX_NAME_BYTES => Err(QuotaError::TooLong {
            what: "parent claim",
            len: s.len(),
            max: MAX_NAME_BYTES,
        }),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(_) => Err(bad("it is neither a string nor an integer")),
    }
}

pub fn request_info() -> Result<RequestInfo> {
    let raw_claims = CLAIMS.text();
    let parent_path = crate::pg::guc::parent_claim_bytes();
    let (sub, plan, parent) =
        LAST_CLAIMS.with(|c| -> Result<(Option<String>, Option<String>, Option<String>)> {
            let mut c = c.borrow_mut();
            if !same_text(c.0.as_bytes(), raw_claims) || c.1.as_bytes() != parent_path {
                let claims = String::from_utf8_lossy(raw_claims).into_owned();
                let path = String::from_utf8_lossy(parent_path).into_owned();
                let (sub, plan, parent) = parse_claims(&claims, &path)?;
                *c = (claims, path, sub, plan, parent);
            }
            Ok((c.2.clone(), c.3.clone(), c.4.clone()))
        })?;
    let sub = match sub {
        Some(s) => Some(s),
        None => {
            // PostgreSQL keeps a session-level SET of it for the life of the connection, so on
            // a pooled connection it would outlive the client that made it: only a value set for
            // this transaction (as PostgREST sets it) counts.
            let (legacy, local) = LEGACY_SUB.text_and_scope();
            (local && !legacy.is_empty()).then(|| String::from_utf8_lossy(legacy).into_owned())
        }
    };
    Ok(RequestInfo {
        sub: check_jwt_subject(sub)?,
        plan,
        parent,
    })
}
