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

const EXTENSION: &CStr = c"quota_ext";

/// `pg_extension.extowner` of quota_ext, read from the catalog (pg_extension has no syscache:
/// a scan of its name index, as get_extension_oid does). Callers remember it
/// (request::extension_owner).
pub fn extension_owner() -> pg_sys::Oid {
    // SAFETY: an index scan of pg_extension under AccessShareLock with a NUL-terminated name
    // key (the name type's equality reads the key as a C string up to NAMEDATALEN); the tuple
    // is read before the scan ends and only a fixed-width field is copied out of it.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::ExtensionRelationId, pg_sys::AccessShareLock as i32);
        let mut key = pg_sys::ScanKeyData::default();
        pg_sys::ScanKeyInit(
            &mut key,
            pg_sys::Anum_pg_extension_extname as pg_sys::AttrNumber,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_NAMEEQ),
            pg_sys::Datum::from(EXTENSION.as_ptr()),
        );
        let scan = pg_sys::systable_beginscan(
            rel,
            pg_sys::Oid::from(pg_sys::ExtensionNameIndexId),
            true,
            std::ptr::null_mut(),
            1,
            &mut key,
        );
        let tup = pg_sys::systable_getnext(scan);
        let owner = if tup.is_null() {
            None
        } else {
            Some((*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_extension>(tup)).extowner)
        };
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        owner.unwrap_or_else(|| pgrx::error!("extension quota_ext is not installed in this database"))
    }
}

/// Columns that later versions added, which the library looks for: between installing a new
/// library and `ALTER EXTENSION quota_ext UPDATE` the tables are still the old version's, and
/// the functions must go on working with them, so the statements that read or write these
/// columns have a form for each shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// quota.audit_log.actor (0.6.0).
    pub audit_actor: bool,
    /// quota.subjects.parent (0.8.0).
    pub subjects_parent: bool,
    /// quota.rate_policies.pooled (0.8.0).
    pub policies_pooled: bool,
    /// The table quota.rate_routes (0.8.0).
    pub rate_routes: bool,
    /// quota.audit_log.subject is NOT NULL (0.9.0): a row that concerns no subject has subject
    /// '' from then on, NULL before (where the row-level policy of the older version would let
    /// a JWT whose sub is '' read '' rows).
    pub audit_subject_required: bool,
    /// The table quota.usage_stripes (0.10.0): hot windows (quota::hot).
    pub usage_stripes: bool,
    /// The files of quota.usage and quota.usage_stripes (pg_class.relfilenode), which the keys
    /// of hot windows hold: a TRUNCATE, VACUUM FULL or DROP and CREATE EXTENSION gives the
    /// tables new files, and the hot windows counted for the old ones are never used again.
    pub usage_files: u64,
}

thread_local! {
    /// (OIDs of the tables looked at, what they have), until a relcache invalidation of one of
    /// them (ALTER EXTENSION UPDATE adds the columns) or of everything.
    static SHAPE: std::cell::Cell<Option<([pg_sys::Oid; 6], Shape)>> = const { std::cell::Cell::new(None) };
}

/// The shape of the installed tables (see Shape), looked up once per backend and after
/// changes to them.
pub fn shape() -> Shape {
    if let Some((_, shape)) = SHAPE.with(std::cell::Cell::get) {
        return shape;
    }
    let (nsp, _) = quota_schema();
    let mut relids = [pg_sys::InvalidOid; 6];
    let mut has = [false; 6];
    for (i, (table, column)) in [
        (c"audit_log", c"actor"),
        (c"subjects", c"parent"),
        (c"rate_policies", c"pooled"),
        (c"rate_routes", c"path_pattern"),
        (c"usage_stripes", c"stripe"),
        (c"usage", c"used"),
    ]
    .iter()
    .enumerate()
    {
        // SAFETY: syscache look-ups by NUL-terminated names and OIDs.
        unsafe {
            relids[i] = pg_sys::get_relname_relid(table.as_ptr(), nsp);
            has[i] = relids[i] != pg_sys::InvalidOid
                && pg_sys::get_attnum(relids[i], column.as_ptr())
                    != pg_sys::InvalidAttrNumber as pg_sys::AttrNumber;
        }
    }
    let shape = Shape {
        audit_actor: has[0],
        subjects_parent: has[1],
        policies_pooled: has[2],
        rate_routes: has[3],
        audit_subject_required: relids[0] != pg_sys::InvalidOid && not_null(relids[0], c"subject"),
        usage_stripes: has[4],
        usage_files: (u64::from(relfilenode(relids[5]).to_u32()) << 32)
            | u64::from(relfilenode(relids[4]).to_u32()),
    };
    SHAPE.with(|a| a.set(Some((relids, shape))));
    shape
}

/// pg_class.relfilenode of a table (InvalidOid for none).
fn relfilenode(relid: pg_sys::Oid) -> pg_sys::Oid {
    if relid == pg_sys::InvalidOid {
        return pg_sys::InvalidOid;
    }
    // SAFETY: a syscache look-up by OID; the tuple is released before return and only a
    // fixed-width field is copied out of it.
    unsafe {
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(relid),
        );
        if tup.is_null() {
            return pg_sys::InvalidOid;
        }
        let node = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup)).relfilenode;
        pg_sys::ReleaseSysCache(tup);
        node
    }
}

/// Whether column `column` of table `relid` is NOT NULL.
fn not_null(relid: pg_sys::Oid, column: &CStr) -> bool {
    // SAFETY: a syscache look-up by OID and NUL-terminated name; the tuple is released before
    // return and only a fixed-width field is copied out of it.
    unsafe {
        let tup = pg_sys::SearchSysCacheAttName(relid, column.as_ptr());
        if tup.is_null() {
            return false;
        }
        let required = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_attribute>(tup)).attnotnull;
        pg_sys::ReleaseSysCache(tup);
        required
    }
}

/// The subject an audit row that concerns no subject is written with: '' once
/// quota.audit_log.subject is NOT NULL (0.9.0), NULL on the tables of an older version; see
/// Shape.
pub fn audit_no_subject() -> Option<&'static str> {
    shape().audit_subject_required.then_some("")
}

/// The files of the usage tables, for the keys of hot windows; see Shape.
pub fn usage_files() -> u64 {
    shape().usage_files
}

/// Lock quota.usage and quota.usage_stripes (RowExclusiveLock, what the statements that write
/// them take anyway, until the transaction ends), then read the shape: a TRUNCATE, VACUUM FULL
/// or CLUSTER of either (AccessExclusiveLock) cannot change their files between a hot window's
/// key and the grant written under it, and a change committed before is seen (taking a lock
/// reads the invalidation messages). Returns whether the stripes exist. Repeats when the
/// tables turned out to be others than those locked (a re-created extension).
pub fn lock_usage_tables() -> bool {
    loop {
        let (relids, _) = match SHAPE.with(std::cell::Cell::get) {
            Some(known) => known,
            None => {
                shape();
                SHAPE.with(std::cell::Cell::get).expect("shape() fills it")
            }
        };
        for relid in [relids[5], relids[4]] {
            if relid != pg_sys::InvalidOid {
                // SAFETY: a lock on a relation OID in the current transaction.
                unsafe { pg_sys::LockRelationOid(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
            }
        }
        let now = shape();
        let (after, _) = SHAPE.with(std::cell::Cell::get).expect("shape() fills it");
        if after[4] == relids[4] && after[5] == relids[5] {
            return now.usage_stripes;
        }
    }
}

/// Whether quota.usage_stripes exists (0.10.0): the hot windows need it; see Shape.
pub fn has_stripes() -> bool {
    shape().usage_stripes
}

/// Whether quota.audit_log has the column `actor` (0.6.0); see Shape.
pub fn audit_has_actor() -> bool {
    shape().audit_actor
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget_shape(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let known = SHAPE.with(std::cell::Cell::get);
    if relid == pg_sys::InvalidOid || known.is_some_and(|(r, _)| r.contains(&relid)) {
        SHAPE.with(|a| a.set(None));
    }
}

pub fn init() {
    // SAFETY: registers a callback of this process (inherited by backends when preloaded);
    // called once from _PG_init.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget_shape), pg_sys::Datum::from(0)) };
}
