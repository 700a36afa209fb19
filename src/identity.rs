//! Who is calling, whom they may act for, and the switch to the extension owner for table access.
//!
//! Functions run as the caller (SECURITY INVOKER), so the caller's role is known when the trust
//! check runs. Only after the check do they switch to the extension owner, the same switch
//! SECURITY DEFINER makes, for the statements that touch quota.* tables; the switch also pins
//! the search path of those statements to pg_catalog (a plan-cache override, not a GUC change:
//! a function-level `SET search_path` recomputes the path on every call and every return).

use crate::catalog;
use crate::error::{QuotaError, Result};
use crate::guc;
use pgrx::pg_sys;
use std::ffi::{CStr, CString};

pub const MAX_NAME_BYTES: usize = 256;

fn role_oid(name: &str) -> Option<pg_sys::Oid> {
    let c = CString::new(name).ok()?;
    // SAFETY: get_role_oid with missing_ok = true returns InvalidOid instead of raising.
    let oid = unsafe { pg_sys::get_role_oid(c.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// Superuser, extension owner, member of service_role, or member of a role in
/// quota_ext.trusted_roles.
pub fn is_trusted() -> bool {
    // SAFETY: plain reads of the current user and catalog caches.
    unsafe {
        let uid = pg_sys::GetUserId();
        if pg_sys::superuser_arg(uid) || uid == catalog::quota_schema().1 {
            return true;
        }
        if let Some(r) = role_oid("service_role") {
            if pg_sys::has_privs_of_role(uid, r) {
                return true;
            }
        }
        if let Some(list) = guc::TRUSTED_ROLES.get() {
            for name in list.to_string_lossy().split(',') {
                let name = name.trim().trim_matches('"');
                if name.is_empty() {
                    continue;
                }
                if let Some(r) = role_oid(name) {
                    if pg_sys::has_privs_of_role(uid, r) {
                        return true;
                    }
                }
            }
        }
        false
    }
}

fn config(name: &CStr) -> Option<String> {
    // SAFETY: GetConfigOption with missing_ok = true returns NULL for unknown settings; the
    // string it returns is copied at once.
    unsafe {
        let p = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if p.is_null() {
            None
        } else {
            Some(CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }
}

/// The caller's JWT subject: request.jwt.claims ->> 'sub', else request.jwt.claim.sub.
pub fn jwt_subject() -> Result<Option<String>> {
    if let Some(raw) = config(c"request.jwt.claims").filter(|s| !s.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(&raw).map_err(|e| QuotaError::MalformedClaims {
            detail: e.to_string(),
        })?;
        match v.get("sub") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => return Ok(Some(s.clone())),
            Some(serde_json::Value::Number(n)) => return Ok(Some(n.to_string())),
            _ => {}
        }
    }
    Ok(config(c"request.jwt.claim.sub").filter(|s| !s.is_empty()))
}

/// A JWT claim as JSON, e.g. `app_metadata`.
#[allow(dead_code)]
pub fn jwt_claim(name: &str) -> Option<serde_json::Value> {
    let raw = config(c"request.jwt.claims")?;
    let v: serde_json::Value = serde_json::from_str(&raw).ok()?;
    v.get(name).cloned()
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

pub fn require_trusted(function: &'static str) -> Result<()> {
    if is_trusted() {
        Ok(())
    } else {
        Err(QuotaError::NotTrusted { function })
    }
}

/// While alive, the backend acts as the extension owner (as SECURITY DEFINER would), in a
/// restricted operation, and resolves names with pg_catalog alone. Dropping it, also during unwinding from an ERROR, switches back;
/// transaction and subtransaction abort would restore the saved user as well.
pub struct AsOwner {
    saved_user: pg_sys::Oid,
    saved_context: i32,
}

/// The search path every statement of the extension resolves names with: pg_catalog alone (no
/// temporary schema, no caller's schema; quota.* objects are always written out).
fn push_pinned_search_path() {
    let mut path = pg_sys::OverrideSearchPath {
        schemas: std::ptr::null_mut(),
        addCatalog: true,
        addTemp: false,
        generation: 0,
    };
    // SAFETY: PushOverrideSearchPath copies the (empty) list into TopMemoryContext; it is
    // popped by AsOwner's drop or, after an ERROR, by the (sub)transaction's abort.
    unsafe { pg_sys::PushOverrideSearchPath(&mut path) };
}

impl AsOwner {
    pub fn enter() -> AsOwner {
        let owner = catalog::quota_schema().1;
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_context = 0;
        // SAFETY: Get/SetUserIdAndSecContext only read and assign backend-local globals.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            pg_sys::SetUserIdAndSecContext(
                owner,
                saved_context
                    | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                    | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
        }
        push_pinned_search_path();
        AsOwner {
            saved_user,
            saved_context,
        }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // SAFETY: restores the values saved in enter(), and pops the search path enter()
        // pushed. While unwinding from an ERROR the override stack may hold entries that the
        // interrupted code never popped (the plan cache pushes one while it re-plans), so
        // nothing is popped then: the abort of the (sub)transaction the ERROR ends pops them all.
        unsafe {
            if !std::thread::panicking() {
                pg_sys::PopOverrideSearchPath();
            }
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context)
        }
    }
}

/// The parts of the JWT the rate limiter needs, parsed once per distinct text of
/// request.jwt.claims (PostgREST sets it per request; a pooled backend sees the same text many
/// times in a row).
#[derive(Clone, Debug, Default)]
pub struct RequestInfo {
    pub sub: Option<String>,
    /// JWT claim app_metadata.plan.
    pub plan: Option<String>,
}

thread_local! {
    static LAST_CLAIMS: std::cell::RefCell<(String, Option<String>, Option<String>)> =
        const { std::cell::RefCell::new((String::new(), None, None)) };
    static LAST_HEADERS: std::cell::RefCell<(String, Option<String>)> =
        const { std::cell::RefCell::new((String::new(), None)) };
}

/// A setting's current text, borrowed (valid until the setting changes; used at once).
fn config_bytes(name: &CStr) -> &'static [u8] {
    // SAFETY: GetConfigOption returns NULL or a NUL-terminated string owned by the GUC machinery;
    // it is read before anything can change the setting.
    unsafe {
        let p = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if p.is_null() {
            &[]
        } else {
            CStr::from_ptr(p).to_bytes()
        }
    }
}

pub fn request_info() -> Result<RequestInfo> {
    let raw_claims = config_bytes(c"request.jwt.claims");
    let (sub, plan) = LAST_CLAIMS.with(|c| -> Result<(Option<String>, Option<String>)> {
        let mut c = c.borrow_mut();
        if c.0.as_bytes() != raw_claims {
            let claims = String::from_utf8_lossy(raw_claims).into_owned();
            let (sub, plan) = if claims.trim().is_empty() {
                (None, None)
            } else {
                let v: serde_json::Value =
                    serde_json::from_str(&claims).map_err(|e| QuotaError::MalformedClaims {
                        detail: e.to_string(),
                    })?;
                let sub = match v.get("sub") {
                    Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
                    Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                    _ => None,
                };
                let plan = v
                    .pointer("/app_metadata/plan")
                    .and_then(|p| p.as_str())
                    .map(str::to_string);
                (sub, plan)
            };
            *c = (claims, sub, plan);
        }
        Ok((c.1.clone(), c.2.clone()))
    })?;
    let sub = match sub {
        Some(s) => Some(s),
        None => {
            let legacy = config_bytes(c"request.jwt.claim.sub");
            (!legacy.is_empty()).then(|| String::from_utf8_lossy(legacy).into_owned())
        }
    };
    Ok(RequestInfo { sub, plan })
}

/// The first address of x-forwarded-for in request.headers (parsed once per distinct text),
/// which keys anonymous callers. Read only when a call needs the caller's own key.
pub fn client_ip() -> Option<String> {
    let raw_headers = config_bytes(c"request.headers");
    LAST_HEADERS.with(|h| {
        let mut h = h.borrow_mut();
        if h.0.as_bytes() != raw_headers {
            let headers = String::from_utf8_lossy(raw_headers).into_owned();
            let ip = serde_json::from_str::<serde_json::Value>(&headers)
                .ok()
                .and_then(|v| {
                    v.get("x-forwarded-for")
                        .and_then(|x| x.as_str())
                        .and_then(|x| x.split(',').next())
                        .map(|x| x.trim().to_string())
                        .filter(|x| !x.is_empty())
                });
            *h = (headers, ip);
        }
        h.1.clone()
    })
}
