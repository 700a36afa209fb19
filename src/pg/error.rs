//! Every refusal the extension raises, each with its own SQLSTATE and a message that says what
//! was wrong, the value given, and what to do about it.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("{what} must not be NULL")]
    NullArgument { what: &'static str, hint: &'static str },

    #[error("{what} must not be empty or blank")]
    EmptyArgument { what: &'static str },

    #[error("{what} is {len} bytes long; the maximum is {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },

    #[error("{what} must not be negative, got {value}")]
    Negative { what: &'static str, value: i64 },

    #[error("unknown period \"{0}\"")]
    UnknownPeriod(String),

    #[error("plan \"{0}\" does not exist")]
    UnknownPlan(String),

    #[error("no limit is defined for metric \"{metric}\" on plan \"{plan}\" of subject \"{subject}\"")]
    NoLimit {
        subject: String,
        metric: String,
        plan: String,
    },

    #[error("idempotency key \"{key}\" was first used for {first}, not for {now}")]
    IdempotencyMismatch { key: String, first: String, now: String },

    #[error(
        "consuming {amount} would overflow the usage counter of \"{metric}\" ({period}), which holds {used}"
    )]
    UsageOverflow {
        metric: String,
        period: String,
        used: i64,
        amount: i64,
    },

    #[error("no JWT subject: this role may only act as the subject of its JWT")]
    NoJwtSubject,

    #[error("request.jwt.claims is not valid JSON")]
    MalformedClaims { detail: String },

    #[error("permission denied to act on subject \"{requested}\"")]
    OtherSubject { requested: String },

    #[error("schema \"quota\" belongs to role \"{schema_owner}\", not to the extension's owner \"{owner}\"")]
    SchemaNotOwned { schema_owner: String, owner: String },

    #[error("permission denied for batch {batch}: it is not yours")]
    NotBatchOwner { batch: String },

    #[error("permission denied to refund: {why}")]
    RefundNotAGrant { why: &'static str },

    #[error("permission denied for {function}: it is reserved to trusted roles")]
    NotTrusted { function: &'static str },

    #[error("{what} must be a positive interval, got {value}")]
    BadInterval { what: &'static str, value: String },

    #[error("{what} must be positive, got {value}")]
    NotPositive { what: &'static str, value: i64 },

    #[error("batch {0} does not exist")]
    UnknownBatch(String),

    #[error("batch id {batch} names batches of {owners} owners")]
    AmbiguousBatch { batch: String, owners: usize },

    #[error("insufficient quantity in {what}: requested {requested}, available {available}")]
    Insufficient {
        what: String,
        requested: i64,
        available: i64,
    },

    #[error("batch {id} is at version {actual}, not the expected {expected}")]
    VersionConflict { id: String, expected: i64, actual: i64 },

    #[error("unknown strategy \"{0}\"")]
    UnknownStrategy(String),

    #[error("rate policy \"{policy}\" has no limits for plan \"{plan}\"")]
    NoPolicy { policy: String, plan: String },

    #[error("quota_ext is not loaded through shared_preload_libraries")]
    NotPreloaded,

    #[error("subject \"{subject}\" cannot have parent \"{parent}\": that makes a cycle")]
    ParentCycle { subject: String, parent: String },

    #[error("the chain of subject \"{subject}\" would be {depth} subjects deep (through \"{parent}\"); the most is 4")]
    ChainTooDeep {
        subject: String,
        parent: String,
        depth: usize,
    },

    #[error("the JWT claim quota_ext.parent_claim names ({path}) cannot name a parent: {why}")]
    BadParentClaim { path: String, why: &'static str },

    #[error("no room for upstream API \"{api}\": quota_ext.upstream_max budgets are in use")]
    UpstreamsFull { api: String },

    #[error("{what} must be a finite time")]
    BadTimestamp { what: &'static str },

    #[error("no room for circuit breaker \"{name}\": quota_ext.breaker_max breakers are in use")]
    BreakersFull { name: String },

    #[error("parent \"{0}\" is not a subject of quota.subjects")]
    UnknownParent(String),

    #[error("{what} must be between {min} and {max}, got {value}")]
    OutOfRange {
        what: &'static str,
        value: f64,
        min: f64,
        max: f64,
    },
}

impl QuotaError {
    fn code(&self) -> Code {
        use QuotaError::*;
        match self {
            NullArgument { .. } => Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            EmptyArgument { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            TooLong { .. } => Code::ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            Negative { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            UnknownPeriod(_) => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            UnknownPlan(_) => Code::ERRCODE_UNDEFINED_OBJECT,
            NoLimit { .. } => Code::ERRCODE_UNDEFINED_OBJECT,
            IdempotencyMismatch { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            UsageOverflow { .. } => Code::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            NoJwtSubject
            | OtherSubject { .. }
            | NotTrusted { .. }
            | RefundNotAGrant { .. }
            | NotBatchOwner { .. } => Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            MalformedClaims { .. } => Code::ERRCODE_INVALID_TEXT_REPRESENTATION,
            BadInterval { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            OutOfRange { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            NotPositive { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            UnknownBatch(_) => Code::ERRCODE_NO_DATA_FOUND,
            AmbiguousBatch { .. } => Code::ERRCODE_CARDINALITY_VIOLATION,
            SchemaNotOwned { .. } => Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            Insufficient { .. } => Code::ERRCODE_CHECK_VIOLATION,
            VersionConflict { .. } => Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            UnknownStrategy(_) => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            NotPreloaded => Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            NoPolicy { .. } => Code::ERRCODE_UNDEFINED_OBJECT,
            ParentCycle { .. } => Code::ERRCODE_INVALID_RECURSION,
            ChainTooDeep { .. } => Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            UnknownParent(_) => Code::ERRCODE_FOREIGN_KEY_VIOLATION,
            BreakersFull { .. } => Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            UpstreamsFull { .. } => Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            BadTimestamp { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            BadParentClaim { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
        }
    }

    fn hint(&self) -> Option<String> {
        use QuotaError::*;
        Some(match self {
            NullArgument { hint, .. } => hint.to_string(),
            EmptyArgument { what } => format!("Pass a non-blank {what}."),
            TooLong { what, .. } => format!("Use a shorter {what}, for example a hash of it."),
            Negative { .. } => "Use quota.refund() to give usage back.".into(),
            UnknownPeriod(_) => "Periods are minute, hour, day, week, month, year and total.".into(),
            UnknownPlan(_) => {
                "Add it first: INSERT INTO quota.plans (plan, description) VALUES (...).".into()
            }
            NoLimit { .. } => {
                "Define one with quota.set_limit(plan, metric, period, max_amount) or quota.set_override(subject, metric, period, max_amount).".into()
            }
            IdempotencyMismatch { .. } => {
                "An idempotency key identifies one request; use a new key for a different request.".into()
            }
            UsageOverflow { .. } => "Reset the counter with quota.reset_usage().".into(),
            NoJwtSubject => {
                "Call through PostgREST with a JWT that has a \"sub\" claim, or set request.jwt.claims.".into()
            }
            MalformedClaims { detail } => format!("Parser said: {detail}"),
            OtherSubject { .. } => {
                "Pass subject => NULL to act as yourself; only trusted roles (see quota_ext.trusted_roles) may act for others.".into()
            }
            SchemaNotOwned { owner, .. } => format!(
                "Its owner could replace what quota_ext runs as \"{owner}\": ALTER SCHEMA quota OWNER TO \"{owner}\" after checking what it holds."
            ),
            NotBatchOwner { .. } => {
                "Untrusted roles consume only batches whose owner is their JWT subject; list yours in quota.batches.".into()
            }
            RefundNotAGrant { .. } => {
                "An untrusted role may refund only a grant it received: pass the idempotency_key of that consume and at most its amount; each grant is refunded once.".into()
            }
            NotTrusted { .. } => {
                "Call it as the extension owner, a superuser, service_role, or a role listed in quota_ext.trusted_roles.".into()
            }
            BadInterval { .. } => "Pass an interval such as '30 days'.".into(),
            OutOfRange { .. } => return None,
            NotPositive { .. } => "Pass a quantity of at least 1.".into(),
            UnknownBatch(_) => "Create batches with quota.create_batch(); list them in quota.batches.".into(),
            AmbiguousBatch { .. } => {
                "Batch ids are unique per owner only (the key of quota.batches is (id, owner)): consume as the owner (its JWT subject), or give one of the batches a new id.".into()
            }
            Insufficient { .. } => "Consume less, or add stock with quota.create_batch().".into(),
            VersionConflict { .. } => {
                "The batch changed since you read it: read it again and retry with its current version.".into()
            }
            UnknownStrategy(_) => "Strategies are fefo (earliest expiry first) and fifo (oldest first).".into(),
            NoPolicy { .. } => {
                "Add a row to quota.rate_policies for that plan, or for quota_ext.default_plan.".into()
            }
            ParentCycle { .. } => {
                "A subject cannot be its own ancestor: detach one link first with quota.set_parent(subject, NULL), and check quota_ext.parent_claim.".into()
            }
            ChainTooDeep { .. } => {
                "A chain holds a subject and at most three ancestors: attach to a subject nearer the top, or detach a level with quota.set_parent(subject, NULL).".into()
            }
            UnknownParent(_) => {
                "Register the parent first, e.g. with quota.set_plan(parent, plan).".into()
            }
            BadParentClaim { .. } => {
                "Point quota_ext.parent_claim at a claim the token's issuer sets (app_metadata), holding the parent subject as a string or an integer, or leave it empty.".into()
            }
            UpstreamsFull { .. } => {
                "Raise quota_ext.upstream_max (a server restart).".into()
            }
            BadTimestamp { .. } => "Pass when the upstream's window resets, e.g. to_timestamp(1767225600).".into(),
            BreakersFull { .. } => {
                "Raise quota_ext.breaker_max (a server restart), or reuse breaker names; quota.breaker_reset() does not free a slot.".into()
            }
            NotPreloaded => {
                "Add quota_ext to shared_preload_libraries in postgresql.conf and restart PostgreSQL.".into()
            }
        })
    }

    /// The error report PostgreSQL raises for it: its SQLSTATE, message, hint and detail.
    pub fn report(self) -> ErrorReport {
        let mut report = ErrorReport::new(self.code(), self.to_string(), "quota_ext");
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        if let QuotaError::OtherSubject { .. } | QuotaError::NoJwtSubject | QuotaError::NotBatchOwner { .. } =
            self
        {
            report = report
                .set_detail("Untrusted roles act only as their JWT subject (request.jwt.claims ->> 'sub').");
        }
        report
    }

    /// Raise this error as a PostgreSQL ERROR. Never returns.
    pub fn raise(self) -> ! {
        self.report().report(PgLogLevel::ERROR);
        unreachable!("ERROR returns control to PostgreSQL")
    }
}

/// An entry point returns `Result<T, ErrorReport>` (spelled out: pgrx reads the return type's
/// tokens); `?` turns a QuotaError into its report, which pgrx raises as it is (SQLSTATE,
/// hint and detail kept).
impl From<QuotaError> for ErrorReport {
    fn from(e: QuotaError) -> ErrorReport {
        e.report()
    }
}

pub type Result<T> = std::result::Result<T, QuotaError>;

/// Unwrap a result or raise its error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}
