//! Running as the extension owner: `AsOwner` switches the user id (and pins search_path) for the
//! statements of a SECURITY DEFINER-like function, and restores both on drop, errors included.

use super::trust::extension_owner;
use super::trust::is_trusted;
use super::trust::TRUST_EPOCH;
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::CStr;

/// While alive, the backend acts as the extension owner (as SECURITY DEFINER would), in a
/// restricted operation, and resolves names with pg_catalog alone. Dropping it, also during unwinding from an ERROR, switches back;
/// transaction and subtransaction abort would restore the saved user as well.
pub struct AsOwner {
    saved_user: pg_sys::Oid,
    saved_context: i32,
    saved_caller: Option<(pg_sys::Oid, bool)>,
    path: PinnedPath,
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

/// The search path every statement of the extension resolves names with: pg_catalog first, no
/// caller's schema (quota.* objects are always written out). Set on enter, restored on drop, or
/// after an ERROR by the (sub)transaction's abort. The value to restore (if any) is returned.
#[cfg(any(feature = "pg15", feature = "pg16"))]
fn pin_search_path() -> PinnedPath {
    // No temporary schema at all.
    let mut path = pg_sys::OverrideSearchPath {
        schemas: std::ptr::null_mut(),
        addCatalog: true,
        addTemp: false,
        generation: 0,
    };
    // SAFETY: PushOverrideSearchPath copies the (empty) list into TopMemoryContext.
    unsafe { pg_sys::PushOverrideSearchPath(&mut path) };
    PinnedPath
}

#[cfg(any(feature = "pg15", feature = "pg16"))]
struct PinnedPath;

#[cfg(any(feature = "pg15", feature = "pg16"))]
impl PinnedPath {
    /// # Safety
    /// Called once, when no override pushed after this one is left.
    unsafe fn unpin(&self) {
        // SAFETY: per the caller.
        unsafe { pg_sys::PopOverrideSearchPath() }
    }
}

/// From PostgreSQL 17 on the override stack is gone: the path is set as a function's SET clause
/// sets it, in a new GUC nesting level that is left on drop (and rolled back by an abort).
/// pg_temp is named last so that no temporary object is found before a catalog one.
#[cfg(not(any(feature = "pg15", feature = "pg16")))]
fn pin_search_path() -> PinnedPath {
    // SAFETY: the nesting level is left by unpin or by the abort of the (sub)transaction; a
    // valid value of a SUSET setting, set by a function running as the extension owner.
    unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        PinnedPath(level)
    }
}

#[cfg(not(any(feature = "pg15", feature = "pg16")))]
struct PinnedPath(std::ffi::c_int);

#[cfg(not(any(feature = "pg15", feature = "pg16")))]
impl PinnedPath {
    /// # Safety
    /// Called once, when no nesting level opened after this one is left.
    unsafe fn unpin(&self) {
        // SAFETY: per the caller.
        unsafe { pg_sys::AtEOXact_GUC(true, self.0) }
    }
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
        let path = pin_search_path();
        AsOwner {
            path,
            saved_user,
            saved_context,
            saved_caller,
        }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // SAFETY: restores the values saved in enter(), and the search path enter() pinned.
        // While unwinding from an ERROR the override stack (or GUC nesting) may hold entries
        // the interrupted code never left (the plan cache pushes one while it re-plans), so
        // nothing is unpinned then: the abort of the (sub)transaction the ERROR ends does it.
        unsafe {
            if !std::thread::panicking() {
                self.path.unpin();
            }
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context)
        }
        CALLER.with(|c| c.set(self.saved_caller));
    }
}
