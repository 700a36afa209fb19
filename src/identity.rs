//! Who is calling, whom they may act for, and the switch to the extension owner for table access.
//!
//! Functions run as the caller (SECURITY INVOKER) with a pinned search_path, so the caller's role
//! is known when the trust check runs. Only after the check do they switch to the extension
//! owner, the same switch SECURITY DEFINER makes, for the statements that touch quota.* tables.

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
pub fn check_name(what: &'static str, value: Option<&str>, hint: &'static str) -> Result<String> {
    let v = value.ok_or(QuotaError::NullArgument { what, hint })?;
    check_present(what, v)?;
    Ok(v.to_string())
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
/// restricted operation. Dropping it, also during unwinding from an ERROR, switches back;
/// transaction and subtransaction abort would restore the saved user as well.
pub struct AsOwner {
    saved_user: pg_sys::Oid,
    saved_context: i32,
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
        AsOwner {
            saved_user,
            saved_context,
        }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // SAFETY: restores the values saved in enter().
        unsafe { pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context) }
    }
}
