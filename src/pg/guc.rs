//! Settings under `quota_ext.*`.

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Which decisions are written to quota.audit_log.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuditMode {
    #[name = c"all"]
    All,
    #[name = c"denials"]
    Denials,
    #[name = c"off"]
    Off,
}

pub static AUDIT: GucSetting<AuditMode> = GucSetting::<AuditMode>::new(AuditMode::All);
pub static DEFAULT_PLAN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"free"));
pub static TRUSTED_ROLES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static CLIENT_IP_HEADER: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"x-forwarded-for"));
pub static TRUSTED_PROXY_HOPS: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static UNTRUSTED_REFUNDS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static PARENT_CLAIM: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static LATENCY: GucSetting<bool> = GucSetting::<bool>::new(true);
static CACHE_TTL: GucSetting<i32> = GucSetting::<i32>::new(0);
static HOT_AFTER: GucSetting<i32> = GucSetting::<i32>::new(100);

/// quota_ext.hot_after: consumes of one subject and metric within a second after which its
/// windows are counted in shared memory (quota::hot); 0: never.
pub fn hot_after() -> u32 {
    HOT_AFTER.get().max(0) as u32
}

/// quota_ext.cache_ttl in nanoseconds (0: the caches live until invalidated).
pub fn cache_ttl_ns() -> i64 {
    CACHE_TTL.get().max(0) as i64 * 1_000_000
}

/// What a new key does in a partition with no bucket to evict (rate::check).
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum WhenFull {
    #[name = c"allow"]
    Allow,
    #[name = c"deny"]
    Deny,
}
pub static RATE_WHEN_FULL: GucSetting<WhenFull> = GucSetting::<WhenFull>::new(WhenFull::Allow);

/// Which rate-limit headers quota.pre_request sends: the IETF draft's structured `RateLimit` and
/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-11), the older `RateLimit-Limit`,
/// `-Remaining`, `-Reset` and `X-RateLimit-*`, or both.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum RateLimitHeaders {
    #[name = c"draft"]
    Draft,
    #[name = c"legacy"]
    Legacy,
    #[name = c"both"]
    Both,
}
pub static RATE_LIMIT_HEADERS: GucSetting<RateLimitHeaders> =
    GucSetting::<RateLimitHeaders>::new(RateLimitHeaders::Both);
// Postmaster settings, defined only while the library is being preloaded.
static RATE_MAX_KEYS: GucSetting<i32> = GucSetting::<i32>::new(100_000);
static AUDIT_QUEUE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024);
static BREAKER_MAX: GucSetting<i32> = GucSetting::<i32>::new(1024);
static UPSTREAM_MAX: GucSetting<i32> = GucSetting::<i32>::new(256);
static HOT_WINDOWS: GucSetting<i32> = GucSetting::<i32>::new(4096);

/// quota_ext.hot_windows: quota windows the shared table of hot windows holds (0: none).
pub fn hot_windows() -> usize {
    HOT_WINDOWS.get().max(0) as usize
}

/// quota_ext.upstream_max: upstream API budgets the shared table holds.
pub fn upstream_max() -> usize {
    UPSTREAM_MAX.get().max(1) as usize
}

/// quota_ext.breaker_max: circuit breakers the shared table holds.
pub fn breaker_max() -> usize {
    BREAKER_MAX.get().max(1) as usize
}

/// quota_ext.rate_max_keys: buckets in the rate table (at least one per partition).
pub fn rate_max_keys() -> usize {
    RATE_MAX_KEYS.get().max(1) as usize
}

/// quota_ext.audit_queue_size: rows the audit queue holds.
pub fn audit_queue_size() -> usize {
    AUDIT_QUEUE_SIZE.get().max(16) as usize
}

/// Define every setting; from _PG_init.
pub fn init() {
    define_quota_settings();
    define_request_settings();
    define_shared_memory_settings();
}

// SUSET throughout: an ordinary role must not raise its own limits (default_plan), widen its own
// trust (trusted_roles), hide its own decisions (audit), choose its own address
// (client_ip_header, trusted_proxy_hops) or leave its organization (parent_claim: a claim its JWT
// does not have would name no parent).

fn define_quota_settings() {
    GucRegistry::define_enum_guc(
        c"quota_ext.audit",
        c"Which quota decisions are written to quota.audit_log: all, denials or off.",
        c"",
        &AUDIT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"quota_ext.default_plan",
        c"Plan of a subject that has no row in quota.subjects.",
        c"",
        &DEFAULT_PLAN,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"quota_ext.untrusted_refunds",
        c"Whether untrusted roles may refund a grant they received (by its idempotency key, once).",
        c"Off: only trusted roles refund. On, a client can give back every grant it was given.",
        &UNTRUSTED_REFUNDS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"quota_ext.latency",
        c"Whether each decision's time is recorded in the latency histograms (quota.latency()).",
        c"Two clock readings and two atomic additions a call.",
        &LATENCY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"quota_ext.cache_ttl",
        c"Longest time a backend keeps the configuration it cached (plans, limits, subjects, policies); 0: until a change invalidates it.",
        c"For installations without the invalidation triggers (Citus reference tables, see quota.citus_prepare()): a direct change of those tables applies within this time.",
        &CACHE_TTL,
        0,
        86_400_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"quota_ext.hot_after",
        c"Consumes of one subject and metric within a second after which its windows are counted in shared memory; 0: never.",
        c"A hot window's callers do not queue on its usage row: each grant is reserved in shared memory and written to a row of the caller's backend (quota.usage_stripes). 1 makes every window hot at its first consume.",
        &HOT_AFTER,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"quota_ext.rate_when_full",
        c"What a rate check on a new key does when no bucket can be evicted: allow or deny.",
        c"",
        &RATE_WHEN_FULL,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"quota_ext.rate_limit_headers",
        c"Which rate-limit headers quota.pre_request sends: draft, legacy or both.",
        c"draft: RateLimit and RateLimit-Policy (IETF draft 11); legacy: RateLimit-Limit/-Remaining/-Reset and X-RateLimit-*.",
        &RATE_LIMIT_HEADERS,
        GucContext::Suset,
        GucFlags::default(),
    );
}

fn define_request_settings() {
    GucRegistry::define_string_guc(
        c"quota_ext.trusted_roles",
        c"Comma-separated roles whose members may act on any subject and call admin functions.",
        c"Superusers, the extension owner and members of service_role are always trusted. Roles that do not exist are ignored.",
        &TRUSTED_ROLES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"quota_ext.parent_claim",
        c"Dotted path of a JWT claim naming the caller's parent subject, e.g. app_metadata.org_id.",
        c"Used when quota.subjects gives the caller no parent, and only if it names a subject of quota.subjects. Empty: none.",
        &PARENT_CLAIM,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"quota_ext.client_ip_header",
        c"Request header whose address list keys anonymous callers ('' for none).",
        c"Read from request.headers, as PostgREST sets it; see quota_ext.trusted_proxy_hops.",
        &CLIENT_IP_HEADER,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"quota_ext.trusted_proxy_hops",
        c"Proxies in front of PostgREST that append the client address to quota_ext.client_ip_header.",
        c"The client address is the entry this many places from the right (1: the rightmost, written by the nearest proxy); 0 trusts no header.",
        &TRUSTED_PROXY_HOPS,
        0,
        64,
        GucContext::Suset,
        GucFlags::default(),
    );
}

fn define_shared_memory_settings() {
    // SAFETY: reads a flag that is set while shared_preload_libraries is processed.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        // A postmaster setting can only be created at server start (PostgreSQL refuses it
        // later with FATAL), and without the preload there is nothing to size.
        GucRegistry::define_int_guc(
            c"quota_ext.rate_max_keys",
            c"Number of rate-limit buckets kept in shared memory (needs a restart).",
            c"",
            &RATE_MAX_KEYS,
            64,
            i32::MAX / 2,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"quota_ext.audit_queue_size",
            c"Audit rows of refusals that can wait in shared memory for the audit writer (needs a restart).",
            c"Each entry takes 3 KiB.",
            &AUDIT_QUEUE_SIZE,
            16,
            1 << 20,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"quota_ext.breaker_max",
            c"Number of circuit breakers kept in shared memory (needs a restart).",
            c"Each takes 56 bytes.",
            &BREAKER_MAX,
            1,
            1 << 20,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"quota_ext.upstream_max",
            c"Number of upstream API budgets kept in shared memory (needs a restart).",
            c"Each takes 48 bytes.",
            &UPSTREAM_MAX,
            1,
            1 << 20,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"quota_ext.hot_windows",
            c"Number of hot quota windows kept in shared memory (needs a restart); 0: no hot windows.",
            c"About 64 bytes each (48-byte slots, a third of them spare).",
            &HOT_WINDOWS,
            0,
            1 << 20,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
}

/// quota_ext.client_ip_header, lower-cased as PostgREST names headers ('' when unset).
pub fn client_ip_header() -> String {
    // SAFETY: the setting's C string, NULL when unset, read at once.
    let raw = unsafe { setting_text(*CLIENT_IP_HEADER.as_ptr()) };
    String::from_utf8_lossy(raw).trim().to_ascii_lowercase()
}

pub fn trusted_proxy_hops() -> usize {
    TRUSTED_PROXY_HOPS.get().max(0) as usize
}

pub fn default_plan() -> String {
    default_plan_str().into_owned()
}

/// quota_ext.default_plan, borrowed from the setting (read at once, before anything can
/// change it).
pub fn default_plan_str() -> std::borrow::Cow<'static, str> {
    // SAFETY: the setting's C string; NULL only if reset to no value.
    unsafe {
        let p = *DEFAULT_PLAN.as_ptr();
        if p.is_null() {
            std::borrow::Cow::Borrowed("free")
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy()
        }
    }
}

/// A string setting's current value as PostgreSQL keeps it, borrowed: empty when NULL.
///
/// # Safety
/// `value` is NULL or a NUL-terminated string owned by the GUC machinery, read at once, before
/// anything can change the setting.
pub unsafe fn setting_text(value: *const std::ffi::c_char) -> &'static [u8] {
    if value.is_null() {
        &[]
    } else {
        // SAFETY: per the caller, a live NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(value).to_bytes() }
    }
}

/// quota_ext.parent_claim as it is set, borrowed (read at once); empty when unset.
pub fn parent_claim_bytes() -> &'static [u8] {
    // SAFETY: the setting's C string, NULL when unset, owned by the GUC machinery.
    unsafe { setting_text(*PARENT_CLAIM.as_ptr()) }
}

/// quota_ext.trusted_roles as it is set, borrowed (read at once); empty when unset.
pub fn trusted_roles_bytes() -> &'static [u8] {
    // SAFETY: the setting's C string, NULL when unset, owned by the GUC machinery.
    unsafe { setting_text(*TRUSTED_ROLES.as_ptr()) }
}

pub fn audit_wanted(success: bool) -> bool {
    match AUDIT.get() {
        AuditMode::All => true,
        AuditMode::Denials => !success,
        AuditMode::Off => false,
    }
}
