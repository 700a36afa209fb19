//! Catalog look-ups the hot paths need, through the syscache (no SPI, nothing to invalidate by
//! hand: the syscache follows DROP/CREATE EXTENSION by itself).

use pgrx::pg_sys;
use std::ffi::CStr;

const SCHEMA: &CStr = c"quota";

/// OID and owner of schema `quota`, which CREATE EXTENSION made and gave to the extension owner.
pub fn quota_schema() -> (pg_sys::Oid, pg_sys::Oid) {
    // SAFETY: a syscache search with a NUL-terminated name key; the tuple is released before
    // return and only two fixed-width fields are copied out of it.
    unsafe {
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::NAMESPACENAME as i32,
            pg_sys::Datum::from(SCHEMA.as_ptr()),
        );
        if tup.is_null() {
            pgrx::error!("schema \"quota\" does not exist; run CREATE EXTENSION quota_ext");
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_namespace>(tup);
        let out = ((*form).oid, (*form).nspowner);
        pg_sys::ReleaseSysCache(tup);
        out
    }
}

/// OID of a type in schema `quota`, such as `decision`.
pub fn quota_type(name: &CStr) -> pg_sys::Oid {
    let (nsp, _) = quota_schema();
    // SAFETY: GetSysCacheOid reads the cache with a NUL-terminated name and an OID key.
    let oid = unsafe {
        pg_sys::GetSysCacheOid(
            pg_sys::SysCacheIdentifier::TYPENAMENSP as i32,
            pg_sys::Anum_pg_type_oid as pg_sys::AttrNumber,
            pg_sys::Datum::from(name.as_ptr()),
            pg_sys::Datum::from(nsp),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    };
    if oid == pg_sys::InvalidOid {
        pgrx::error!(
            "type quota.{} does not exist; reinstall quota_ext",
            name.to_string_lossy()
        );
    }
    oid
}

thread_local! {
    /// Result row types by function OID, resolved once per backend (a handful of functions).
    /// A function re-created by DROP/CREATE EXTENSION gets a new OID, so an entry never goes
    /// stale; the descriptors live in TopMemoryContext.
    static RESULT_TYPES: std::cell::RefCell<Vec<(pg_sys::Oid, usize)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The result row type of the function being called, resolved and blessed once per backend
/// and kept in `fn_extra` at each call site, so the hot path looks nothing up (a statement
/// that pgbench or PostgREST runs anew each time is a new call site).
///
/// # Safety
/// `fcinfo` must be the call's own, for a function returning a composite type.
pub unsafe fn result_tupdesc(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::TupleDesc {
    unsafe {
        let flinfo = (*fcinfo).flinfo;
        if !(*flinfo).fn_extra.is_null() {
            return (*flinfo).fn_extra.cast();
        }
        let oid = (*flinfo).fn_oid;
        let known = RESULT_TYPES.with(|t| t.borrow().iter().find(|e| e.0 == oid).map(|e| e.1));
        let kept = match known {
            Some(td) => td as pg_sys::TupleDesc,
            None => {
                let mut td: pg_sys::TupleDesc = std::ptr::null_mut();
                let kind = pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut td);
                if kind != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE || td.is_null() {
                    pgrx::error!("quota_ext: this function must return a composite type");
                }
                let previous = pg_sys::CurrentMemoryContext;
                pg_sys::CurrentMemoryContext = pg_sys::TopMemoryContext;
                let kept = pg_sys::BlessTupleDesc(pg_sys::CreateTupleDescCopy(td));
                pg_sys::CurrentMemoryContext = previous;
                RESULT_TYPES.with(|t| t.borrow_mut().push((oid, kept as usize)));
                kept
            }
        };
        (*flinfo).fn_extra = kept.cast();
        kept
    }
}
