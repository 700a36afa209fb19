\echo Use "CREATE EXTENSION quota_ext" to load this file. \quit

-- quota_ext schema: tables, indexes and helpers; functions with logic are in Rust.

-- Schema quota must belong to the role installing the extension. CREATE EXTENSION uses a
-- schema of that name that already exists, and a role with CREATE on the database can make
-- one first: as its owner it could then drop or replace any object the extension puts in it.
DO $squat$
DECLARE
    schema_owner text;
    ext_owner    text;
BEGIN
    SELECT pg_catalog.pg_get_userbyid(n.nspowner), pg_catalog.pg_get_userbyid(e.extowner)
      INTO schema_owner, ext_owner
      FROM pg_catalog.pg_namespace AS n, pg_catalog.pg_extension AS e
     WHERE n.nspname = 'quota' AND e.extname = 'quota_ext';
    IF schema_owner IS DISTINCT FROM ext_owner THEN
        RAISE EXCEPTION USING
            ERRCODE = '42P06',
            MESSAGE = pg_catalog.format('schema "quota" already exists and belongs to role %I, not to %I, who installs quota_ext',
                                        schema_owner, ext_owner),
            DETAIL  = 'The owner of a schema can drop and replace every object in it, so quota_ext only installs into a schema of its own owner.',
            HINT    = pg_catalog.format('Look at what schema quota holds, then DROP SCHEMA quota (or ALTER SCHEMA quota OWNER TO %I) and run CREATE EXTENSION quota_ext again.',
                                        ext_owner);
    END IF;
END
$squat$;
-- Released versions are frozen in sql/frozen/; each later change ships as
-- sql/quota_ext--<old>--<new>.sql and is added here too, so a fresh install equals an upgrade.

CREATE TABLE quota.plans (
    plan        text PRIMARY KEY CHECK (btrim(plan) <> '' AND octet_length(plan) <= 256),
    description text NOT NULL DEFAULT ''
);

INSERT INTO quota.plans (plan, description) VALUES
    ('anonymous',  'Callers without a JWT subject'),
    ('free',       'Default plan (quota_ext.default_plan)'),
    ('pro',        'Paid plan'),
    ('enterprise', 'Contract plan');

CREATE TABLE quota.limits (
    plan       text   NOT NULL REFERENCES quota.plans (plan) ON UPDATE CASCADE ON DELETE CASCADE,
    metric     text   NOT NULL CHECK (btrim(metric) <> '' AND octet_length(metric) <= 256),
    period     text   NOT NULL CHECK (period IN ('minute', 'hour', 'day', 'week', 'month', 'year', 'total')),
    max_amount bigint NOT NULL CHECK (max_amount >= 0),
    PRIMARY KEY (plan, metric, period)
);

-- plan NULL: the subject follows its JWT claim app_metadata.plan or quota_ext.default_plan, as a
-- subject without a row does (a row may exist only to give a subject its parent).
CREATE TABLE quota.subjects (
    subject    text        PRIMARY KEY CHECK (btrim(subject) <> '' AND octet_length(subject) <= 256),
    plan       text        REFERENCES quota.plans (plan) ON UPDATE CASCADE,
    time_zone  text        NOT NULL DEFAULT 'UTC',
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Whatever the application keeps about a subject (billing ids, ...).
    metadata   jsonb       NOT NULL DEFAULT '{}',
    -- Pooled quotas: the organization (or team) whose limits a charge of this subject also
    -- applies, set by quota.set_parent (which refuses cycles and chains of more than four).
    parent     text        CONSTRAINT subjects_parent_fkey REFERENCES quota.subjects (subject)
                           ON UPDATE CASCADE ON DELETE SET NULL,
    -- set_parent(subject, NULL) was called: no parent, also none from a JWT claim
    -- (quota_ext.parent_claim), until set_parent gives it one again.
    detached   boolean     NOT NULL DEFAULT false,
    CONSTRAINT subjects_parent_not_self CHECK (parent <> subject)
);
CREATE INDEX subjects_plan_idx ON quota.subjects (plan);
CREATE INDEX subjects_parent_idx ON quota.subjects (parent) WHERE parent IS NOT NULL;

CREATE TABLE quota.overrides (
    subject    text   NOT NULL CHECK (btrim(subject) <> '' AND octet_length(subject) <= 256),
    metric     text   NOT NULL CHECK (btrim(metric) <> '' AND octet_length(metric) <= 256),
    period     text   NOT NULL CHECK (period IN ('minute', 'hour', 'day', 'week', 'month', 'year', 'total')),
    max_amount bigint NOT NULL CHECK (max_amount >= 0),
    PRIMARY KEY (subject, metric, period)
);

-- One row per subject, metric, period and calendar window. Updates touch no indexed column, so
-- the free space left by fillfactor lets them stay HOT. `used` stays >= 0 by construction (only
-- consume adds, its undo subtracts exactly what it added, refund clamps at 0); a CHECK would
-- cost every consume a constraint evaluation set up anew per statement.
CREATE TABLE quota.usage (
    subject      text        NOT NULL,
    metric       text        NOT NULL,
    period       text        NOT NULL,
    window_start timestamptz NOT NULL,
    used         bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, metric, period, window_start)
) WITH (fillfactor = 80);
CREATE INDEX usage_subject_metric_window_idx ON quota.usage (subject, metric, window_start DESC);
-- near_limit reads the current windows only, and prune's usage retention the old ones, through
-- this index instead of every row ever written; inserts of a new window update it, increments
-- of `used` (HOT updates) do not.
CREATE INDEX usage_period_window_idx ON quota.usage (period, window_start);

-- The usage of a hot window beyond its usage row (src/quota/hot.rs; README, Internals): a
-- window many callers charge at once is counted in shared memory, and each grant is written to
-- the row of the backend that made it (stripe: the backend's process number), which no other
-- caller locks. A window's usage is its usage row plus its stripes; a stripe can be negative
-- (a refund), the sum never is.
CREATE TABLE quota.usage_stripes (
    subject      text        NOT NULL,
    metric       text        NOT NULL,
    period       text        NOT NULL,
    window_start timestamptz NOT NULL,
    stripe       integer     NOT NULL,
    used         bigint      NOT NULL DEFAULT 0,
    CONSTRAINT usage_stripes_pkey PRIMARY KEY (subject, metric, period, window_start, stripe)
) WITH (fillfactor = 80);
-- No other index: a cold grant's check finds a window's stripes by the key's first four columns,
-- and prune, the only reader by period, scans the table (a row per hot window and backend).

-- What each window has used: its usage row plus its stripes (hot windows). Every window with
-- stripes has a usage row. As the caller (security_invoker): row level security of the tables
-- applies.
CREATE VIEW quota.usage_totals WITH (security_invoker = true) AS
SELECT u.subject, u.metric, u.period, u.window_start,
       u.used + coalesce((SELECT sum(st.used) FROM quota.usage_stripes AS st
                           WHERE st.subject = u.subject AND st.metric = u.metric
                             AND st.period = u.period AND st.window_start = u.window_start), 0)::bigint AS used
  FROM quota.usage AS u;

CREATE TABLE quota.idempotency_keys (
    subject    text        NOT NULL,
    key        text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    response   jsonb,
    PRIMARY KEY (subject, key)
);
CREATE INDEX idempotency_keys_created_at_idx ON quota.idempotency_keys (created_at);

-- Each session takes ids 32 at a time (a shared sequence touched per row would serialize
-- concurrent writers): ids are unique, increasing within a session, and only roughly in time
-- order across sessions.
--
-- The key is (id, subject): a key holds the column a Citus cluster distributes the table by
-- (docs/citus.md), and id first serves the look-ups by id alone. Rows of an administrative
-- change that concerns no subject (a plan's limits) have subject '' (never a subject's name).
CREATE TABLE quota.audit_log (
    id              bigint      GENERATED ALWAYS AS IDENTITY (CACHE 32),
    created_at      timestamptz NOT NULL DEFAULT now(),
    subject         text        NOT NULL,
    action          text        NOT NULL,
    metric          text,
    amount          bigint,
    success         boolean     NOT NULL,
    reason          text,
    details         jsonb,
    idempotency_key text,
    -- The role that acted, when it was a trusted one (an administrator, or a service acting
    -- for the subject); NULL when the subject acted as itself.
    actor           text,
    CONSTRAINT audit_log_pkey PRIMARY KEY (id, subject)
);
-- audit_page: one subject, newest first, keyset on (created_at, id).
CREATE INDEX audit_log_subject_created_at_idx ON quota.audit_log (subject, created_at DESC, id DESC);
-- Monitoring of refusals.
CREATE INDEX audit_log_failures_idx ON quota.audit_log (created_at DESC) WHERE NOT success;
-- prune: rows arrive in created_at order, so a BRIN index finds old ones for almost no upkeep.
CREATE INDEX audit_log_created_at_brin ON quota.audit_log USING brin (created_at);

CREATE TYPE quota.decision AS (
    allowed             boolean,
    subject             text,
    metric              text,
    period              text,
    used                bigint,
    quota_limit         bigint,
    remaining           bigint,
    reset_at            timestamptz,
    retry_after_seconds integer,
    replayed            boolean,
    -- The subject whose window binds: the subject itself or one of its ancestors.
    binding_subject     text
);

-- Rate-limit policies per plan, read by quota.rate_limit() and quota.pre_request().
CREATE TABLE quota.rate_policies (
    policy text     NOT NULL CHECK (btrim(policy) <> '' AND octet_length(policy) <= 256),
    plan   text     NOT NULL REFERENCES quota.plans (plan) ON UPDATE CASCADE ON DELETE CASCADE,
    rate   bigint   NOT NULL CHECK (rate > 0),
    per    interval NOT NULL DEFAULT '1 minute' CHECK (per > '0'::interval),
    burst  bigint   CHECK (burst > 0),
    shadow boolean  NOT NULL DEFAULT false,
    -- A caller with a parent spends its parent's bucket, with the parent's plan's limits.
    pooled boolean  NOT NULL DEFAULT false,
    PRIMARY KEY (policy, plan)
);
INSERT INTO quota.rate_policies (policy, plan, rate, per) VALUES
    ('default', 'anonymous',    20, '1 minute'),
    ('default', 'free',        100, '1 minute'),
    ('default', 'pro',        1000, '1 minute'),
    ('default', 'enterprise', 10000, '1 minute');

-- Per-route rate limits for quota.pre_request: every row whose method (or '*') and LIKE pattern
-- match the request (request.method, request.path) applies its policy, in priority order, to a
-- bucket keyed by the caller ('user': the JWT subject, the address for anon) or by its address
-- ('ip'); all must allow. With no matching row, the method rule (read / write / default).
CREATE TABLE quota.rate_routes (
    method       text    NOT NULL CHECK (method = '*' OR method ~ '^[A-Z]+$'),
    path_pattern text    NOT NULL CHECK (path_pattern <> '' AND octet_length(path_pattern) <= 1024),
    policy       text    NOT NULL CHECK (btrim(policy) <> '' AND octet_length(policy) <= 256),
    key_by       text    NOT NULL DEFAULT 'user' CHECK (key_by IN ('user', 'ip')),
    priority     integer NOT NULL DEFAULT 100,
    PRIMARY KEY (method, path_pattern, policy)
);

CREATE TYPE quota.rate_decision AS (
    allowed             boolean,
    key                 text,
    rate_limit          bigint,
    remaining           bigint,
    reset_after_seconds double precision,
    retry_after_seconds double precision
);

-- Calendar window of `period` containing `at`, in `time_zone` (weeks start on Monday). `total`
-- has one window that never resets. A window ends where the next one starts: both are the
-- same local wall-clock time (the next period's first instant) turned into a timestamptz, so
-- where a DST change skips midnight (America/Havana, 2024-03-10) no hour falls in two windows.
-- A plain SQL function, so the planner inlines it.
CREATE FUNCTION quota.window_bounds(period text, time_zone text, at_time timestamptz DEFAULT now())
RETURNS TABLE (window_start timestamptz, reset_at timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE ROWS 1
AS $$
    SELECT CASE WHEN period = 'total' THEN '-infinity'::pg_catalog.timestamptz
                ELSE pg_catalog.date_trunc(period, at_time, time_zone) END,
           CASE WHEN period = 'total' THEN NULL::pg_catalog.timestamptz
                ELSE pg_catalog.timezone(time_zone,
                         pg_catalog.date_trunc(period, pg_catalog.timezone(time_zone, at_time))
                         + CAST(pg_catalog.concat('1 ', period) AS pg_catalog.interval)) END
$$;

-- Circuit breakers (quota.breaker_allow / breaker_record): their state is in shared memory;
-- this table holds the rules of the named ones (a name without a row uses the defaults, the
-- seed's: 5 failures open it, after 60 s one probe goes through).
CREATE TABLE quota.breakers (
    name              text             PRIMARY KEY CHECK (btrim(name) <> '' AND octet_length(name) <= 256),
    failure_threshold integer          NOT NULL DEFAULT 5 CHECK (failure_threshold > 0),
    open_seconds      double precision NOT NULL DEFAULT 60 CHECK (open_seconds > 0 AND open_seconds <= 31536000),
    half_open_probes  integer          NOT NULL DEFAULT 1 CHECK (half_open_probes > 0)
);

CREATE TYPE quota.breaker_decision AS (
    allowed             boolean,
    name                text,
    state               text,
    failures            integer,
    retry_after_seconds double precision
);

-- Budgets of upstream APIs (quota.upstream_observe / upstream_acquire): state in shared memory;
-- this table holds each API's reserve, what acquires never spend (0 without a row).
CREATE TABLE quota.upstreams (
    api     text   PRIMARY KEY CHECK (btrim(api) <> '' AND octet_length(api) <= 256),
    reserve bigint NOT NULL DEFAULT 0 CHECK (reserve >= 0)
);

CREATE TYPE quota.upstream_decision AS (
    allowed             boolean,
    api                 text,
    remaining           bigint,
    reset_at            timestamptz,
    retry_after_seconds double precision
);

-- Inventory batches: quantities consumed under row locks, with a version for optimistic checks.
-- The key is (id, owner): owner is the column a Citus cluster distributes the table by, and id
-- first serves the look-ups by id alone (ids are random: gen_random_uuid()).
CREATE TABLE quota.batches (
    id               uuid        NOT NULL DEFAULT gen_random_uuid(),
    owner            text        NOT NULL CHECK (btrim(owner) <> '' AND octet_length(owner) <= 256),
    item             text        NOT NULL CHECK (btrim(item) <> '' AND octet_length(item) <= 256),
    quantity         bigint      NOT NULL CHECK (quantity >= 0),
    initial_quantity bigint      NOT NULL CHECK (initial_quantity >= 0),
    expires_at       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    version          bigint      NOT NULL DEFAULT 1,
    metadata         jsonb       NOT NULL DEFAULT '{}',
    CONSTRAINT batches_pkey PRIMARY KEY (id, owner)
) WITH (fillfactor = 80);
-- consume_item: an owner's non-empty batches of an item in expiry order (no expiry last, then
-- oldest first).
CREATE INDEX batches_owner_item_fefo_idx ON quota.batches (owner, item, expires_at ASC NULLS LAST, created_at, id)
    WHERE quantity > 0;
