//! Reading the request settings PostgREST sets (`request.jwt.claims`, `request.headers`) on every
//! call, cheaply, and whether they were set for the current transaction only.

use crate::pg::guc;
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::CStr;
use std::thread::LocalKey;

/// A setting read on every call, and where this backend last found it.
pub(super) struct RequestSetting {
    name: &'static CStr,
    last_found: &'static LocalKey<Cell<LastFound>>,
}

thread_local! {
    static CLAIMS_LAST_FOUND: Cell<LastFound> = const { Cell::new(LastFound::UNKNOWN) };
    static LEGACY_SUB_LAST_FOUND: Cell<LastFound> = const { Cell::new(LastFound::UNKNOWN) };
    static HEADERS_LAST_FOUND: Cell<LastFound> = const { Cell::new(LastFound::UNKNOWN) };
    static PATH_LAST_FOUND: Cell<LastFound> = const { Cell::new(LastFound::UNKNOWN) };
}

pub(super) static CLAIMS: RequestSetting = RequestSetting {
    name: c"request.jwt.claims",
    last_found: &CLAIMS_LAST_FOUND,
};
pub(super) static LEGACY_SUB: RequestSetting = RequestSetting {
    name: c"request.jwt.claim.sub",
    last_found: &LEGACY_SUB_LAST_FOUND,
};
pub(super) static HEADERS: RequestSetting = RequestSetting {
    name: c"request.headers",
    last_found: &HEADERS_LAST_FOUND,
};
pub(super) static PATH: RequestSetting = RequestSetting {
    name: c"request.path",
    last_found: &PATH_LAST_FOUND,
};

impl RequestSetting {
    /// The setting's current text, borrowed (valid until the setting changes; used at once);
    /// empty when unset.
    pub(super) fn text(&self) -> &'static [u8] {
        self.text_and_scope().0
    }

    /// The setting's current text and whether that value was set for the current transaction
    /// only (`SET LOCAL`, `set_config(..., true)`), as PostgREST sets its request settings,
    /// rather than for the session.
    pub(super) fn text_and_scope(&self) -> (&'static [u8], bool) {
        let record = self.last_found.with(|last_found| find(self.name, last_found));
        // SAFETY: a record just found is live; a string setting's variable points at its
        // current value, NULL or a NUL-terminated string owned by the GUC machinery, which is
        // read before anything can change the setting.
        unsafe {
            let value = match record {
                None => std::ptr::null(),
                Some(r) if (*r).vartype == pg_sys::config_type::PGC_STRING => {
                    *(*r.cast::<pg_sys::config_string>()).variable as *const std::ffi::c_char
                }
                // Not a string setting (no request setting is one): as GetConfigOption shows it.
                Some(_) => pg_sys::GetConfigOption(self.name.as_ptr(), true, false),
            };
            (
                guc::setting_text(value),
                record.is_some_and(|r| set_in_transaction(r)),
            )
        }
    }
}

/// Whether the record's current value was set for this transaction only: the newest entry of
/// its stack says how it was set in this transaction (no entry: not set in it at all).
///
/// # Safety
/// `record` is a live settings record.
unsafe fn set_in_transaction(record: *mut pg_sys::config_generic) -> bool {
    // SAFETY: per the caller.
    unsafe {
        let top = (*record).stack;
        !top.is_null()
            && matches!(
                (*top).state,
                pg_sys::GucStackState::GUC_LOCAL | pg_sys::GucStackState::GUC_SET_LOCAL
            )
    }
}

/// From PostgreSQL 16 on, settings live in a hash table and find_option is exported: a lookup
/// costs one hash of the name. Records can be freed (a placeholder replaced when its extension
/// defines the setting), so nothing is remembered between calls.
#[cfg(not(feature = "pg15"))]
#[derive(Clone, Copy)]
struct LastFound;

#[cfg(not(feature = "pg15"))]
impl LastFound {
    const UNKNOWN: LastFound = LastFound;
}

#[cfg(not(feature = "pg15"))]
fn find(name: &CStr, _spot: &Cell<LastFound>) -> Option<*mut pg_sys::config_generic> {
    // SAFETY: a lookup that creates nothing and, with skip_errors, raises nothing.
    let r = unsafe { pg_sys::find_option(name.as_ptr(), false, true, pgrx::PgLogLevel::ERROR as i32) };
    (!r.is_null()).then_some(r)
}

/// PostgreSQL 15 keeps its settings in an array sorted by name, and GetConfigOption finds one
/// by a binary search comparing names letter by letter; the request settings are read on every
/// rate and quota call. So each backend remembers where the setting was (record and index), or,
/// when absent, which two records would surround it, and checks that memory against the array
/// before trusting it: the same record still at that index with that name, or the two
/// neighbours still adjacent and still sorting around the name (so nothing, the setting
/// included, was added between them). Any change of the array (a new placeholder, one removed
/// by MarkGUCPrefixReserved, a reordering) fails the check and the setting is looked up again.
#[cfg(feature = "pg15")]
#[derive(Clone, Copy)]
enum LastFound {
    Unknown,
    At(usize, *mut pg_sys::config_generic),
    Absent(usize, *mut pg_sys::config_generic, *mut pg_sys::config_generic),
}

#[cfg(feature = "pg15")]
impl LastFound {
    const UNKNOWN: LastFound = LastFound::Unknown;
}

#[cfg(feature = "pg15")]
fn find(name: &CStr, last_found: &Cell<LastFound>) -> Option<*mut pg_sys::config_generic> {
    let wanted = name.to_bytes();
    // SAFETY: the settings array and its length are read together, with nothing in between that
    // could change them; indexes are checked against the length before use, and a record is only
    // dereferenced after it was found in the array at that index (so it is live).
    unsafe {
        let vars = pg_sys::get_guc_variables();
        let n = pg_sys::GetNumConfigOptions().max(0) as usize;
        if let Some(known) = still_there(last_found.get(), wanted, vars, n) {
            return known;
        }
        let all = std::slice::from_raw_parts(vars, n);
        match all.binary_search_by(|&r| record_order(r, wanted)) {
            Ok(i) => {
                last_found.set(LastFound::At(i, all[i]));
                Some(all[i])
            }
            Err(i) => {
                let lo = if i == 0 { std::ptr::null_mut() } else { all[i - 1] };
                let hi = if i == n { std::ptr::null_mut() } else { all[i] };
                last_found.set(LastFound::Absent(i, lo, hi));
                None
            }
        }
    }
}

/// What the remembered last_found says, if the array still agrees with it: Some(record), Some(None)
/// for a setting still absent, None when it must be looked up again.
///
/// # Safety
/// `vars` is the settings array and `n` its length, read together just before.
#[cfg(feature = "pg15")]
unsafe fn still_there(
    last_found: LastFound,
    wanted: &[u8],
    vars: *mut *mut pg_sys::config_generic,
    n: usize,
) -> Option<Option<*mut pg_sys::config_generic>> {
    // SAFETY: indexes are checked against the length before use; a record is only compared
    // after it was found in the array at that index (so it is live).
    unsafe {
        let at = |i: usize| *vars.add(i);
        match last_found {
            LastFound::At(i, rec) => {
                (i < n && at(i) == rec && record_order(rec, wanted).is_eq()).then_some(Some(rec))
            }
            LastFound::Absent(i, lo, hi) => {
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
            LastFound::Unknown => None,
        }
    }
}

/// Setting names compare as guc.c's guc_name_compare does: ASCII letters downcased, then as
/// `char`, which is signed on the platforms PostgreSQL runs on here (x86-64, so a byte of 0x80
/// or above sorts before every ASCII one), and a shorter name first.
#[cfg(feature = "pg15")]
fn guc_name_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let signed = |c: &u8| c.to_ascii_lowercase() as std::ffi::c_char;
    a.iter().map(signed).cmp(b.iter().map(signed))
}

/// # Safety
/// `record` is a live record of the settings array.
#[cfg(feature = "pg15")]
unsafe fn record_order(record: *mut pg_sys::config_generic, name: &[u8]) -> std::cmp::Ordering {
    // SAFETY: per the caller, a live record, whose name is a NUL-terminated string.
    unsafe { guc_name_order(CStr::from_ptr((*record).name).to_bytes(), name) }
}

/// Equal texts. Two empty ones (the usual case outside PostgREST) compare without calling
/// memcmp: both are then dangling pointers, and glibc's AVX-512 memcmp reads through them with
/// an empty mask, which the CPU fault-suppresses in microcode, slowly.
pub(super) fn same_text(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}
