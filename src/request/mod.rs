//! Who is calling, whom they may act for, and the switch to the extension owner for table access.
//!
//! Functions run as the caller (SECURITY INVOKER), so the caller's role is known when the trust
//! check runs. Only after the check do they switch to the extension owner, the same switch
//! SECURITY DEFINER makes, for the statements that touch quota.* tables; the switch also pins
//! the search path of those statements to pg_catalog (a plan-cache override, not a GUC change:
//! a function-level `SET search_path` recomputes the path on every call and every return).

use crate::pg::catalog;
use crate::pg::error::{QuotaError, Result};
use crate::pg::guc;
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
        if uid == extension_owner() {
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

thread_local! {
    /// The extension owner, with the TRUST_EPOCH it was read under.
    static OWNER_MEMO: Cell<Option<(u64, pg_sys::Oid)>> = const { Cell::new(None) };
}

/// The extension's owner, `pg_extension.extowner`: the role every table access switches to
/// and that is always trusted. Never the owner of schema `quota`, which a role with CREATE on
/// the database could have made before CREATE EXTENSION (the install and upgrade scripts
/// refuse such a schema). As a last line, the switch is refused while schema `quota` belongs
/// to anyone else: its owner could swap the tables the extension's statements name.
/// Remembered per backend until the catalog caches report a change of roles or schemas (the
/// schema's owner changing, by ALTER SCHEMA or REASSIGN OWNED, reports one; a new CREATE
/// EXTENSION in a schema left by DROP EXTENSION needs that schema's owner, so the same role).
pub fn extension_owner() -> pg_sys::Oid {
    let epoch = TRUST_EPOCH.with(Cell::get);
    if let Some((e, owner)) = OWNER_MEMO.with(Cell::get) {
        if e == epoch {
            return owner;
        }
    }
    let owner = catalog::extension_owner();
    let schema_owner = catalog::quota_schema().1;
    if schema_owner != owner {
        let name = |oid: pg_sys::Oid| {
            // SAFETY: a syscache read of a role's name (NULL for a dropped role, noerr).
            let p = unsafe { pg_sys::GetUserNameFromId(oid, true) };
            if p.is_null() {
                format!("oid {}", oid.to_u32())
            } else {
                // SAFETY: a palloc'd NUL-terminated name.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        QuotaError::SchemaNotOwned {
            schema_owner: name(schema_owner),
            owner: name(owner),
        }
        .raise();
    }
    OWNER_MEMO.with(|m| m.set(Some((epoch, owner))));
    owner
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
    saved_caller: Option<(pg_sys::Oid, bool)>,
}

thread_local! {
    /// The role that called, and whether it is trusted, while an AsOwner lives (the outermost
    /// one's caller: a nested switch finds the owner as the current user).
    static CALLER: Cell<Option<(pg_sys::Oid, bool)>> = const { Cell::new(None) };
    /// A role's name, with the TRUST_EPOCH it was read under (roles renamed move it).
    static ROLE_NAME: std::cell::RefCell<Option<(u64, pg_sys::Oid, String)>> = const { std::cell::RefCell::new(None) };
}

/// Who acted, for the audit trail: the calling role when it is trusted (an administrator, or
/// a service acting for a subject); None for an untrusted caller, which only ever acts as its
/// own subject (the row's subject says who it was). Read inside an AsOwner switch.
pub fn actor() -> Option<String> {
    let (uid, trusted) = CALLER.with(Cell::get)?;
    if !trusted {
        return None;
    }
    let epoch = TRUST_EPOCH.with(Cell::get);
    ROLE_NAME.with(|n| {
        let mut n = n.borrow_mut();
        match &*n {
            Some((e, u, name)) if *e == epoch && *u == uid => Some(name.clone()),
            _ => {
                // SAFETY: a syscache read of the role's name; NULL (noerr) for a role that
                // was dropped meanwhile.
                let p = unsafe { pg_sys::GetUserNameFromId(uid, true) };
                let name = if p.is_null() {
                    format!("oid {}", uid.to_u32())
                } else {
                    // SAFETY: a palloc'd NUL-terminated name.
                    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
                };
                *n = Some((epoch, uid, name.clone()));
                Some(name)
            }
        }
    })
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
        let owner = extension_owner();
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_context = 0;
        let saved_caller = CALLER.with(Cell::get);
        // SAFETY: Get/SetUserIdAndSecContext only read and assign backend-local globals.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            if saved_caller.is_none() || saved_user != owner {
                CALLER.with(|c| c.set(Some((saved_user, is_trusted()))));
            }
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
            saved_caller,
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
        CALLER.with(|c| c.set(self.saved_caller));
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
    /// (request.headers, the address found, client_ip_header, trusted_proxy_hops)
    static LAST_HEADERS: std::cell::RefCell<(String, Option<String>, String, usize)> =
        const { std::cell::RefCell::new((String::new(), None, String::new(), 0)) };
}

/// Where a setting read on every call was last found in PostgreSQL's array of settings (kept
/// sorted by name), or between which two records it would sort when absent.
#[derive(Clone, Copy)]
enum SettingPosition {
    Unknown,
    At(usize, *mut pg_sys::config_generic),
    Absent(usize, *mut pg_sys::config_generic, *mut pg_sys::config_generic),
}

thread_local! {
    static CLAIMS_SPOT: Cell<SettingPosition> = const { Cell::new(SettingPosition::Unknown) };
    static LEGACY_SUB_SPOT: Cell<SettingPosition> = const { Cell::new(SettingPosition::Unknown) };
    static HEADERS_SPOT: Cell<SettingPosition> = const { Cell::new(SettingPosition::Unknown) };
}

/// Setting names compare as guc.c's guc_name_compare does: ASCII letters downcased, then as
/// `char`, which is signed on the platforms PostgreSQL runs on here (x86-64, so a byte of 0x80
/// or above sorts before every ASCII one), and a shorter name first.
fn guc_name_order(a: &[u8], b: &[u8]) -> Ordering {
    let signed = |c: &u8| c.to_ascii_lowercase() as std::ffi::c_char;
    a.iter().map(signed).cmp(b.iter().map(signed))
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
fn config_bytes(name: &CStr, spot: &'static LocalKey<Cell<SettingPosition>>) -> &'static [u8] {
    config_setting(name, spot).0
}

/// A setting's current text (as config_bytes) and whether that value was set for the current
/// transaction only (`SET LOCAL`, `set_config(..., true)`), as PostgREST sets its request
/// settings, rather than for the session.
fn config_setting(name: &CStr, spot: &'static LocalKey<Cell<SettingPosition>>) -> (&'static [u8], bool) {
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
            SettingPosition::At(i, rec) => {
                (i < n && at(i) == rec && record_order(rec, wanted).is_eq()).then_some(Some(rec))
            }
            SettingPosition::Absent(i, lo, hi) => {
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
            SettingPosition::Unknown => None,
        };
        let record = match known {
            Some(r) => r,
            None => {
                let all = std::slice::from_raw_parts(vars, n);
                match all.binary_search_by(|&r| record_order(r, wanted)) {
                    Ok(i) => {
                        spot.set(SettingPosition::At(i, all[i]));
                        Some(all[i])
                    }
                    Err(i) => {
                        let lo = if i == 0 { std::ptr::null_mut() } else { all[i - 1] };
                        let hi = if i == n { std::ptr::null_mut() } else { all[i] };
                        spot.set(SettingPosition::Absent(i, lo, hi));
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
        // The newest entry of the record's stack says how its current value was set in this
        // transaction; no entry: it was not set in this transaction at all.
        let local = record.is_some_and(|r| {
            let top = (*r).stack;
            !top.is_null()
                && matches!(
                    (*top).state,
                    pg_sys::GucStackState::GUC_LOCAL | pg_sys::GucStackState::GUC_SET_LOCAL
                )
        });
        (guc::setting_text(value), local)
    }
}

/// Equal texts. Two empty ones (the usual case outside PostgREST) compare without calling
/// memcmp: both are then dangling pointers, and glibc's AVX-512 memcmp reads through them with
/// an empty mask, which the CPU fault-suppresses in microcode, slowly.
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
            // PostgreSQL keeps a session-level SET of it for the life of the connection, so on
            // a pooled connection it would outlive the client that made it: only a value set for
            // this transaction (as PostgREST sets it) counts.
            let (legacy, local) = config_setting(c"request.jwt.claim.sub", &LEGACY_SUB_SPOT);
            (local && !legacy.is_empty()).then(|| String::from_utf8_lossy(legacy).into_owned())
        }
    };
    Ok(RequestInfo {
        sub: check_jwt_subject(sub)?,
        plan,
    })
}

/// The client address that keys anonymous callers: from the header named by
/// quota_ext.client_ip_header in request.headers (PostgREST passes every request header there,
/// names lower-cased), the entry quota_ext.trusted_proxy_hops from the right of its
/// comma-separated list: with one proxy that appends the address it received the request from,
/// the rightmost entry, which that proxy wrote and the client cannot choose. A list shorter
/// than the hops gives its leftmost entry (still written by one of the proxies). No header
/// configured, 0 hops or no such header: None (the caller is `ip:unknown`). Parsed once per
/// distinct text of request.headers and of the two settings; read only when a call needs the
/// caller's own key.
pub fn client_ip() -> Option<String> {
    let raw_headers = config_bytes(c"request.headers", &HEADERS_SPOT);
    let header = guc::client_ip_header();
    let hops = guc::trusted_proxy_hops();
    LAST_HEADERS.with(|h| {
        let mut h = h.borrow_mut();
        if !same_text(h.0.as_bytes(), raw_headers) || h.2 != header || h.3 != hops {
            let headers = String::from_utf8_lossy(raw_headers).into_owned();
            let ip = address_from(&headers, &header, hops);
            *h = (headers, ip, header, hops);
        }
        h.1.clone()
    })
}

/// The entry `hops` from the right of header `name` in the JSON object `headers`.
pub fn address_from(headers: &str, name: &str, hops: usize) -> Option<String> {
    if name.is_empty() || hops == 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(headers).ok()?;
    let list = v.get(name)?.as_str()?;
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    let at = entries.len().saturating_sub(hops);
    Some(entries[at]).filter(|x| !x.is_empty()).map(normalize_address)
}

/// One key per client, whatever the proxy's notation: a port and brackets go (`[2001:db8::1]:443`,
/// `192.0.2.1:5000`), an IPv4-mapped IPv6 address is its IPv4 address, and an IPv6 address
/// counts by its /64 (one subscriber's network: every host of it can take any address in it).
/// What does not parse is kept as it is, cut at 64 characters.
pub fn normalize_address(entry: &str) -> String {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};
    let e = entry.trim().trim_matches('"');
    let ip = e
        .parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            e.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|x| x.parse::<IpAddr>().ok())
        });
    match ip {
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        None => e.chars().take(MAX_ADDRESS_CHARS).collect(),
    }
}

/// Longest unparsed address kept.
const MAX_ADDRESS_CHARS: usize = 64;
