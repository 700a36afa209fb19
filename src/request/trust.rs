//! Who is trusted: the roles named by quota_ext.trusted_roles (and those that inherit them),
//! superusers, and the extension's owner; memoized per backend until the roles change.

use crate::pg::catalog;
use crate::pg::error::{QuotaError, Result};
use crate::pg::guc;
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::{CStr, CString};

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
    pub(super) static TRUST_EPOCH: Cell<u64> = const { Cell::new(0) };
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
pub(super) unsafe extern "C-unwind" fn forget_trust(
    _arg: pg_sys::Datum,
    _cache: std::ffi::c_int,
    _hash: u32,
) {
    TRUST_EPOCH.with(|e| e.set(e.get().wrapping_add(1)));
}

pub fn require_trusted(function: &'static str) -> Result<()> {
    if is_trusted() {
        Ok(())
    } else {
        Err(QuotaError::NotTrusted { function })
    }
}
