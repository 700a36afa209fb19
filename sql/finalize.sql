-- Functions written in SQL on top of the Rust ones, then privileges and row level security.

-- Like consume, but a denial raises SQLSTATE PT429 (PostgREST answers HTTP 429) with the
-- decision as JSON in DETAIL, so the caller's whole transaction aborts. SECURITY INVOKER on
-- purpose: consume must see the real caller to apply the identity rules.
CREATE FUNCTION quota.require(subject text DEFAULT NULL, metric text DEFAULT NULL,
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
                             metric, d.period, d.subject, d.used, d.quota_limit),
            DETAIL  = pg_catalog.to_json(d)::text,
            HINT    = CASE WHEN d.retry_after_seconds IS NULL
                           THEN 'The amount exceeds the limit; it can never be granted.'
                           ELSE format('Retry after %s seconds.', d.retry_after_seconds) END;
    END IF;
    RETURN d;
END
$$;

-- Changes to what the per-backend limits cache is built from reach every backend at commit.
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.limits
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.overrides
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.subjects
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.plans
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.rate_policies
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();

-- PostgREST's db-pre-request: rate-limit every request by policy 'read' (GET, HEAD) or
-- 'write', falling back to 'default'. Sets the RateLimit-* headers; a denial raises PostgREST's
-- custom status error, answered as HTTP 429 with Retry-After. Trusted roles pass unlimited.
CREATE FUNCTION quota.pre_request()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d       quota.rate_decision;
    reset_s bigint;
    headers json;
BEGIN
    d := quota.request_rate_decision(current_setting('request.method', true));
    IF d IS NULL THEN
        RETURN;
    END IF;
    reset_s := ceil(d.reset_after_seconds)::bigint;
    headers := json_build_array(
        json_build_object('RateLimit-Limit', d.rate_limit::text),
        json_build_object('RateLimit-Remaining', d.remaining::text),
        json_build_object('RateLimit-Reset', reset_s::text),
        json_build_object('X-RateLimit-Limit', d.rate_limit::text),
        json_build_object('X-RateLimit-Remaining', d.remaining::text),
        json_build_object('X-RateLimit-Reset', (extract(epoch FROM now())::bigint + reset_s)::text));
    PERFORM set_config('response.headers', headers::text, true);
    IF NOT d.allowed THEN
        RAISE SQLSTATE 'PGRST' USING
            MESSAGE = json_build_object(
                'code', 'PT429',
                'message', 'Too Many Requests',
                'details', format('rate limit of %s reached for %s', d.rate_limit, d.key),
                'hint', CASE WHEN d.retry_after_seconds IS NULL THEN 'The request costs more than the limit allows.'
                             ELSE format('Retry after %s seconds.', ceil(d.retry_after_seconds)) END)::text,
            DETAIL = json_build_object(
                'status', 429,
                'status_text', 'Too Many Requests',
                'headers', json_build_object(
                    'Retry-After', coalesce(ceil(d.retry_after_seconds)::bigint, 3600)::text,
                    'RateLimit-Limit', d.rate_limit::text,
                    'RateLimit-Remaining', d.remaining::text,
                    'RateLimit-Reset', reset_s::text))::text;
    END IF;
END
$$;

-- Nothing is callable by PUBLIC; grants below, or by hand (see README) without Supabase roles.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA quota FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA quota FROM PUBLIC;

-- Authenticated users read their own rows; nobody but the owner writes (functions do, as owner).
ALTER TABLE quota.usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.batches ENABLE ROW LEVEL SECURITY;

CREATE POLICY usage_own_rows ON quota.usage FOR SELECT
    USING (subject = coalesce(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
                              nullif(current_setting('request.jwt.claim.sub', true), '')));
CREATE POLICY audit_own_rows ON quota.audit_log FOR SELECT
    USING (subject = coalesce(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
                              nullif(current_setting('request.jwt.claim.sub', true), '')));

CREATE POLICY batches_own_rows ON quota.batches FOR SELECT
    USING (owner = coalesce(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
                            nullif(current_setting('request.jwt.claim.sub', true), '')));

DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT USAGE ON SCHEMA quota TO service_role;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA quota TO service_role;
        GRANT SELECT ON ALL TABLES IN SCHEMA quota TO service_role;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        GRANT USAGE ON SCHEMA quota TO authenticated;
        GRANT EXECUTE ON FUNCTION
            quota.consume(text, text, bigint, text),
            quota.require(text, text, bigint, text),
            quota.require_decision(text, text, bigint, text),
            quota.refund(text, text, bigint, text),
            quota.status(text),
            quota.audit_page(text, bigint, integer),
            quota.consume_batch_quantity(uuid, bigint, bigint),
            quota.consume_item(text, text, bigint, text),
            quota.rate_limit(text, text, bigint),
            quota.pre_request(),
            quota.request_rate_decision(text)
        TO authenticated;
        GRANT SELECT ON quota.usage, quota.audit_log, quota.batches, quota.plans, quota.limits TO authenticated;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        GRANT USAGE ON SCHEMA quota TO anon;
        GRANT EXECUTE ON FUNCTION
            quota.rate_limit(text, text, bigint),
            quota.pre_request(),
            quota.request_rate_decision(text)
        TO anon;
    END IF;
END
$grants$;
