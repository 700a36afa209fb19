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
use std::cell::Cell;
use std::cmp::Ordering;
use std::ffi::{CStr, CString};
use std::thread::LocalKey;

pub const MAX_NAME_BYTES: usize = 256;

fn role_oid(name: &str) -> Option<pg_sys::Oid> {
    let c = CString::new(name).ok()?;
    // SAFETY: get_role_oid with missing_ok = true returns InvalidOid instead of raising.
    let oid = unsafe { pg_sys::get_role_oid(c.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// Superuser, extension owner, member of service_role, or member of a role in
/// quota_ext.trusted_roles.
///
/// Every request-path call asks, and for the roles PostgREST uses (`anon`, `authenticated`) the
/// answer takes several catalog look-ups (the schema's owner, service_role, each listed role)
/// and a string allocation each. So each backend remembers the last answer with what it was
/// for: the current user and the text of quota_ext.trusted_roles. Anything else it depends on
/// lives in pg_authid, pg_auth_members or pg_namespace, whose catalog caches tell
/// `forget_trust` of every change (a role created, dropped, renamed or made superuser, a
/// membership granted or revoked, the schema's owner changed), in this session at once and
/// from others when PostgreSQL reads their invalidations, as it does for its own role caches.
pub fn is_trusted() -> bool {
    // SAFETY: plain reads of the current user and of superuser_arg's own one-role cache.
    let uid = unsafe { pg_sys::GetUserId() };
    if unsafe { pg_sys::superuser_arg(uid) } {
        return true;
    }
    let roles = guc::trusted_roles_bytes();
    let epoch = TRUST_EPOCH.with(Cell::get);
    let known = TRUST_MEMO.with(|m| match &*m.borrow() {
        Some(t) if t.epoch == epoch && t.uid == uid && t.roles.as_slice() == roles => Some(t.trusted),
        _ => None,
    });
    if let Some(trusted) = known {
        return trusted;
    }
    let roles = roles.to_vec();
    let trusted = trust_of(uid, &roles);
    // Remembered under the epoch read before the look-ups: a change reported while they ran
    // (catalog reads can take in invalidations) leaves the memory stale at once.
    TRUST_MEMO.with(|m| {
        *m.borrow_mut() = Some(TrustMemo {
            epoch,
            uid,
            roles,
            trusted,
        })
    });
    trusted
}

fn trust_of(uid: pg_sys::Oid, trusted_roles: &[u8]) -> bool {
    // SAFETY: plain reads of catalog caches.
    unsafe {
        if uid == catalog::quota_schema().1 {
            return true;
        }
        if let Some(r) = role_oid("service_role") {
            if pg_sys::has_privs_of_role(uid, r) {
                return true;
            }
        }
        for name in String::from_utf8_lossy(trusted_roles).split(',') {
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
        false
    }
}

struct TrustMemo {
    epoch: u64,
    uid: pg_sys::Oid,
    roles: Vec<u8>,
    trusted: bool,
}

thread_local! {
    static TRUST_MEMO: std::cell::RefCell<Option<TrustMemo>> = const { std::cell::RefCell::new(None) };
    /// Bumped by every reported change of roles, memberships or schemas.
    static TRUST_EPOCH: Cell<u64> = const { Cell::new(0) };
}

/// Catalog cache callback. Runs inside invalidation processing: it only bumps a counter.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget_trust(_arg: pg_sys::Datum, _cache: std::ffi::c_int, _hash: u32) {
    TRUST_EPOCH.with(|e| e.set(e.get().wrapping_add(1)));
}

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

/// The caller's JWT subject: request.jwt.claims ->> 'sub', else request.jwt.claim.sub.
pub fn jwt_subject() -> Result<Option<String>> {
    Ok(request_info()?.sub)
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

/// Where a setting read on every call was last found in PostgreSQL's array of settings (kept
/// sorted by name), or between which two records it would sort when absent.
#[derive(Clone, Copy)]
enum Spot {
    Unknown,
    At(usize, *mut pg_sys::config_generic),
    Absent(usize, *mut pg_sys::config_generic, *mut pg_sys::config_generic),
}

thread_local! {
    static CLAIMS_SPOT: Cell<Spot> = const { Cell::new(Spot::Unknown) };
    static LEGACY_SUB_SPOT: Cell<Spot> = const { Cell::new(Spot::Unknown) };
    static HEADERS_SPOT: Cell<Spot> = const { Cell::new(Spot::Unknown) };
}

/// Setting names compare as guc.c's guc_name_compare does: bytes, ASCII letters downcased.
fn guc_name_order(a: &[u8], b: &[u8]) -> Ordering {
    a.iter()
        .map(u8::to_ascii_lowercase)
        .cmp(b.iter().map(u8::to_ascii_lowercase))
}

/// # Safety
/// `record` is a live record of the settings array.
unsafe fn record_order(record: *mut pg_sys::config_generic, name: &[u8]) -> Ordering {
    // SAFETY: per the caller, a live record, whose name is a NUL-terminated string.
    unsafe { guc_name_order(CStr::from_ptr((*record).name).to_bytes(), name) }
}

/// A setting's current text, borrowed (valid until the setting changes; used at once).
///
/// GetConfigOption finds a setting by a binary search over its name, comparing names letter
/// by letter, and the request settings are read on every rate and quota call. So each backend
/// remembers where the setting was (record and index), or, when absent, which two records
/// would surround it, and checks that memory against the array before trusting it: the same
/// record still at that index with that name, or the two neighbours still adjacent and still
/// sorting around the name (so nothing, the setting included, was added between them). Any
/// change of the array (a new placeholder, one removed by MarkGUCPrefixReserved, a reordering)
/// fails the check and the setting is looked up again.
fn config_bytes(name: &CStr, spot: &'static LocalKey<Cell<Spot>>) -> &'static [u8] {
    let wanted = name.to_bytes();
    // SAFETY: the settings array and its length are read together, with nothing in between that
    // could change them; indexes are checked against the length before use, and a record is only
    // dereferenced after it was found in the array at that index (so it is live). A string
    // setting's variable points at its current value, NULL or a NUL-terminated string owned by
    // the GUC machinery, which is read before anything can change the setting.
    unsafe {
        let vars = pg_sys::get_guc_variables();
        let n = pg_sys::GetNumConfigOptions().max(0) as usize;
        let at = |i: usize| *vars.add(i);
        let known = match spot.get() {
            Spot::At(i, rec) => {
                (i < n && at(i) == rec && record_order(rec, wanted).is_eq()).then_some(Some(rec))
            }
            Spot::Absent(i, lo, hi) => {
                let lo_ok = if i == 0 {
                    lo.is_null()
                } else {
                    i <= n && at(i - 1) == lo && record_order(lo, wanted).is_lt()
                };
                let hi_ok = if i == n {
                    hi.is_null()
                } else {
                    i < n && at(i) == hi && record_order(hi, wanted).is_gt()
                };
                (lo_ok && hi_ok).then_some(None)
            }
            Spot::Unknown => None,
        };
        let record = match known {
            Some(r) => r,
            None => {
                let all = std::slice::from_raw_parts(vars, n);
                match all.binary_search_by(|&r| record_order(r, wanted)) {
                    Ok(i) => {
                        spot.set(Spot::At(i, all[i]));
                        Some(all[i])
                    }
                    Err(i) => {
                        let lo = if i == 0 { std::ptr::null_mut() } else { all[i - 1] };
                        let hi = if i == n { std::ptr::null_mut() } else { all[i] };
                        spot.set(Spot::Absent(i, lo, hi));
                        None
                    }
                }
            }
        };
        let value = match record {
            None => std::ptr::null(),
            Some(r) if (*r).vartype == pg_sys::config_type::PGC_STRING => {
                *(*r.cast::<pg_sys::config_string>()).variable as *const std::ffi::c_char
            }
            // Not a string setting (no request setting is one): as GetConfigOption shows it.
            Some(_) => pg_sys::GetConfigOption(name.as_ptr(), true, false),
        };
        guc::setting_text(value)
    }
}

/// Equal texts. Two empty ones (the usual case outside PostgREST) compare without calling
/// memcmp: both are then dangling pointers, and glibc's AVX-512 memcmp reads through them with
/// an empty mask, which the CPU fault-suppresses in microcode at a cost of hundreds of cycles
/// (perf put a tenth of rate_limit's time on that call).
fn same_text(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

pub fn request_info() -> Result<RequestInfo> {
    let raw_claims = config_bytes(c"request.jwt.claims", &CLAIMS_SPOT);
    let (sub, plan) = LAST_CLAIMS.with(|c| -> Result<(Option<String>, Option<String>)> {
        let mut c = c.borrow_mut();
        if !same_text(c.0.as_bytes(), raw_claims) {
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
            let legacy = config_bytes(c"request.jwt.claim.sub", &LEGACY_SUB_SPOT);
            (!legacy.is_empty()).then(|| String::from_utf8_lossy(legacy).into_owned())
        }
    };
    Ok(RequestInfo { sub, plan })
}

/// The first address of x-forwarded-for in request.headers (parsed once per distinct text),
/// which keys anonymous callers. Read only when a call needs the caller's own key.
pub fn client_ip() -> Option<String> {
    let raw_headers = config_bytes(c"request.headers", &HEADERS_SPOT);
    LAST_HEADERS.with(|h| {
        let mut h = h.borrow_mut();
        if !same_text(h.0.as_bytes(), raw_headers) {
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
