//! Prepared statements kept for the life of the backend, so each call only binds and executes.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::{PgBuiltInOids, PgOid};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A statement and its parameter types. All statements are prepared as read-write, so each
/// execution takes a fresh snapshot at READ COMMITTED and sees the rows it waited for.
pub struct Stmt {
    pub sql: &'static str,
    pub args: &'static [PgBuiltInOids],
}

thread_local! {
    static PREPARED: RefCell<HashMap<usize, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

fn prepared(client: &SpiClient<'_>, stmt: &'static Stmt) -> Rc<OwnedPreparedStatement> {
    let key = stmt as *const Stmt as usize;
    if let Some(p) = PREPARED.with(|m| m.borrow().get(&key).cloned()) {
        return p;
    }
    let types: Vec<PgOid> = stmt.args.iter().map(|t| PgOid::BuiltIn(*t)).collect();
    let plan = Rc::new(
        client
            .prepare_mut(stmt.sql, &types)
            .unwrap_or_else(|e| panic!("quota_ext: cannot prepare statement: {e}"))
            .keep(),
    );
    PREPARED.with(|m| m.borrow_mut().insert(key, plan.clone()));
    plan
}

/// Execute a kept statement. The Rc is cloned out of the cache first, so a statement that
/// re-enters quota_ext (a user trigger, say) finds the cache free.
///
/// Executed through `select`, not `update`: pgrx's `update` marks the transaction as mutable by
/// assigning it a transaction ID, which every read would then burn, and which fails on a hot
/// standby. The plans are prepared read-write, so each execution still takes a fresh snapshot,
/// and PostgreSQL assigns an ID by itself when a statement does write.
pub fn run<'conn>(
    client: &mut SpiClient<'conn>,
    stmt: &'static Stmt,
    args: &[DatumWithOid<'_>],
) -> SpiTupleTable<'conn> {
    let plan = prepared(client, stmt);
    client
        .select(&*plan, None, args)
        .unwrap_or_else(|e| panic!("quota_ext: statement failed: {e}"))
}

pub fn get<T: IntoDatum + FromDatum>(row: &pgrx::spi::SpiHeapTupleData<'_>, n: usize) -> Option<T> {
    row.get::<T>(n)
        .unwrap_or_else(|e| panic!("quota_ext: column {n}: {e}"))
}
