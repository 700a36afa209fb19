\echo Use "ALTER EXTENSION quota_ext UPDATE TO '0.8.0'" to load this file. \quit

-- 0.7.0 -> 0.8.0: pooled quotas (organizations and their members), near_limit on the current
-- windows only, a retention for old usage windows, circuit breakers shared by every backend.

-- A subject's parent (quota.set_parent); a row may now exist only to hold it, without a plan.
ALTER TABLE quota.subjects ALTER COLUMN plan DROP NOT NULL;
ALTER TABLE quota.subjects
    ADD COLUMN parent text CONSTRAINT subjects_parent_fkey REFERENCES quota.subjects (subject)
                           ON UPDATE CASCADE ON DELETE SET NULL,
    -- set_parent(subject, NULL) was called: no parent, also none from a JWT claim.
    ADD COLUMN detached boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT subjects_parent_not_self CHECK (parent <> subject);
CREATE INDEX subjects_parent_idx ON quota.subjects (parent) WHERE parent IS NOT NULL;

-- near_limit reads the current windows only, and prune's usage retention the old ones, through
-- this index instead of every row ever written; inserts of a new window update it, increments
-- of `used` (HOT updates) do not.
CREATE INDEX usage_period_window_idx ON quota.usage (period, window_start);

-- The subject whose window binds: the subject itself or one of its ancestors.
ALTER TYPE quota.decision ADD ATTRIBUTE binding_subject text;

-- A caller with a parent spends its parent's bucket, with the parent's plan's limits.
ALTER TABLE quota.rate_policies ADD COLUMN pooled boolean NOT NULL DEFAULT false;

-- Circuit breakers: rules per name (state in shared memory), the answer type, the functions.
CREATE TABLE quota.breakers (
    name              text             PRIMARY KEY CHECK (btrim(name) <> '' AND octet_length(name) <= 256),
    failure_threshold integer          NOT NULL DEFAULT 5 CHECK (failure_threshold > 0),
    open_seconds      double precision NOT NULL DEFAULT 60 CHECK (open_seconds > 0 AND open_seconds <= 31536000),
    half_open_probes  integer          NOT NULL DEFAULT 1 CHECK (half_open_probes > 0)
);
ALTER TABLE quota.breakers ENABLE ROW LEVEL SECURITY;
SELECT pg_catalog.pg_extension_config_dump('quota.breakers', '');
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.breakers
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();

CREATE TYPE quota.breaker_decision AS (
    allowed             boolean,
    name                text,
    state               text,
    failures            integer,
    retry_after_seconds double precision
);

CREATE FUNCTION quota.breaker_allow(name text) RETURNS quota.breaker_decision
VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'breaker_allow_wrapper';

CREATE FUNCTION quota.breaker_record(name text, success boolean) RETURNS quota.breaker_decision
VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'breaker_record_wrapper';

CREATE FUNCTION quota.breaker_reset(name text) RETURNS quota.breaker_decision
VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'breaker_reset_wrapper';

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
ALTER TABLE quota.rate_routes ENABLE ROW LEVEL SECURITY;
SELECT pg_catalog.pg_extension_config_dump('quota.rate_routes', '');
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.rate_routes
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();

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
ALTER TABLE quota.upstreams ENABLE ROW LEVEL SECURITY;
SELECT pg_catalog.pg_extension_config_dump('quota.upstreams', '');
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.upstreams
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();

CREATE FUNCTION quota.upstream_observe(api text, quota_limit bigint, remaining bigint, reset_at timestamptz)
RETURNS quota.upstream_decision
VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'upstream_observe_wrapper';

CREATE FUNCTION quota.upstream_acquire(api text, cost bigint DEFAULT 1) RETURNS quota.upstream_decision
VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'upstream_acquire_wrapper';

CREATE FUNCTION quota.health() RETURNS TABLE ("check" text, ok boolean, detail text)
STRICT VOLATILE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'health_wrapper';

CREATE FUNCTION quota.latency()
RETURNS TABLE ("function" text, calls bigint, mean_ms double precision, p50_ms double precision,
               p95_ms double precision, p99_ms double precision)
STRICT VOLATILE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'latency_wrapper';

CREATE FUNCTION quota.set_parent(subject text, parent text) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'set_parent_wrapper';

CREATE FUNCTION quota.own_chain() RETURNS text[]
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'own_chain_wrapper';

-- prune gains usage_older_than (default NULL: keep usage) and its count.
DROP FUNCTION quota.prune(interval, interval);
CREATE FUNCTION quota.prune(
    audit_older_than interval DEFAULT '90 days',
    idempotency_older_than interval DEFAULT '7 days',
    usage_older_than interval DEFAULT NULL
) RETURNS TABLE (audit_deleted bigint, idempotency_deleted bigint, usage_deleted bigint)
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'prune_wrapper';

CREATE OR REPLACE FUNCTION quota.require(subject text DEFAULT NULL, metric text DEFAULT NULL,
                              amount bigint DEFAULT 1, idempotency_key text DEFAULT NULL)
RETURNS quota.decision
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d quota.decision;
BEGIN
    -- consume, but a denial's audit row is queued: the raise below rolls this transaction back.
    d := quota.require_decision(subject, metric, amount, idempotency_key);
    IF NOT d.allowed THEN
        RAISE EXCEPTION USING
            ERRCODE = 'PT429',
            MESSAGE = format('quota exceeded: %s of %s for subject %s (%s/%s used)',
                             metric, d.period, coalesce(d.binding_subject, d.subject), d.used, d.quota_limit),
            DETAIL  = pg_catalog.to_json(d)::text,
            HINT    = CASE WHEN d.retry_after_seconds IS NULL
                           THEN 'The amount exceeds the limit; it can never be granted.'
                           ELSE format('Retry after %s seconds.', d.retry_after_seconds) END;
    END IF;
    RETURN d;
END
$$;

CREATE OR REPLACE FUNCTION quota.replace_shipped_rate_policy()
RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE quota.rate_policies r
       SET rate = NEW.rate, per = NEW.per, burst = NEW.burst, shadow = NEW.shadow, pooled = NEW.pooled
     WHERE (r.policy, r.plan) = (NEW.policy, NEW.plan)
       AND r.burst IS NULL AND NOT r.shadow AND NOT r.pooled
       AND (r.policy, r.plan, r.rate, r.per) IN (VALUES
            ('default', 'anonymous',     20::bigint, '1 minute'::interval),
            ('default', 'free',         100, '1 minute'),
            ('default', 'pro',         1000, '1 minute'),
            ('default', 'enterprise', 10000, '1 minute'));
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;

-- A member reads its organization's usage rows too: quota.own_chain() is the JWT subject and
-- its ancestors.
ALTER POLICY usage_own_rows ON quota.usage USING (subject = ANY ((SELECT quota.own_chain())::text[]));

REVOKE ALL ON FUNCTION quota.set_parent(text, text), quota.own_chain(),
    quota.prune(interval, interval, interval), quota.breaker_allow(text),
    quota.breaker_record(text, boolean), quota.breaker_reset(text),
    quota.upstream_observe(text, bigint, bigint, timestamptz), quota.upstream_acquire(text, bigint),
    quota.health(), quota.latency() FROM PUBLIC;
REVOKE ALL ON quota.breakers, quota.rate_routes, quota.upstreams FROM PUBLIC;
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT EXECUTE ON FUNCTION quota.set_parent(text, text), quota.own_chain(),
            quota.prune(interval, interval, interval), quota.breaker_allow(text),
            quota.breaker_record(text, boolean), quota.breaker_reset(text),
            quota.upstream_observe(text, bigint, bigint, timestamptz), quota.upstream_acquire(text, bigint),
            quota.health(), quota.latency() TO service_role;
        GRANT SELECT ON quota.breakers, quota.rate_routes, quota.upstreams TO service_role;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        GRANT EXECUTE ON FUNCTION quota.own_chain() TO authenticated;
    END IF;
END
$grants$;

-- The usage policy now calls quota.own_chain(): every role that may read quota.usage (granted
-- by hand, without the Supabase roles) may call it too, or its reads would fail.
DO $own_chain$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT a.grantee::pg_catalog.regrole AS role
               FROM pg_catalog.pg_class AS c, pg_catalog.aclexplode(c.relacl) AS a
              WHERE c.oid = 'quota.usage'::pg_catalog.regclass AND a.privilege_type = 'SELECT'
                AND a.grantee <> 0 AND a.grantee <> c.relowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION quota.own_chain() TO %s', r.role);
    END LOOP;
END
$own_chain$;
