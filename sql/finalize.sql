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
                             metric, d.period, coalesce(d.binding_subject, d.subject), d.used, d.quota_limit),
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
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.breakers
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.rate_routes
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();
CREATE TRIGGER limits_cache_invalidation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.upstreams
    FOR EACH STATEMENT EXECUTE FUNCTION quota.invalidate_limits_cache();

-- PostgREST's db-pre-request: rate-limit every request by policy 'read' (GET, HEAD) or
-- 'write', falling back to 'default'. quota.request_rate_limit sets the rate-limit headers
-- (quota_ext.rate_limit_headers) and exposes them to browsers; a denial raises PostgREST's custom
-- status error, answered as HTTP 429 with Retry-After and the same headers. Trusted roles pass
-- unlimited.
CREATE FUNCTION quota.pre_request()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    denial text[];
BEGIN
    denial := quota.request_rate_limit(current_setting('request.method', true));
    IF denial IS NOT NULL THEN
        RAISE SQLSTATE 'PGRST' USING MESSAGE = denial[1], DETAIL = denial[2];
    END IF;
END
$$;

-- Take from one batch (quota.take_batch_quantity). Called through PostgREST, the refusals
-- that PostgREST would misreport get an HTTP status of their own: a version conflict (40001)
-- is 409 Conflict (PostgREST retries a 40001 as a serialization failure, and the version never
-- matches again: the request would hang), an unknown batch (P0002) 404; their SQLSTATE, message
-- and hint stay in the JSON body. SQL callers get the SQLSTATEs themselves, without the
-- subtransaction the translation takes. No function-level search_path, which would cost every
-- call a settings save and restore: every name and operator here is schema-qualified.
CREATE FUNCTION quota.consume_batch_quantity(p_batch_id uuid, p_quantity_to_consume bigint,
                                             p_expected_version bigint DEFAULT NULL)
RETURNS TABLE (batch_id uuid, consumed bigint, remaining bigint, version bigint)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    state   text;
    message text;
    detail  text;
    hint    text;
BEGIN
    IF pg_catalog.current_setting('request.method', true) IS NULL
       OR pg_catalog.current_setting('request.method', true) OPERATOR(pg_catalog.=) '' THEN
        RETURN QUERY SELECT * FROM quota.take_batch_quantity(p_batch_id, p_quantity_to_consume, p_expected_version);
        RETURN;
    END IF;
    BEGIN
        RETURN QUERY SELECT * FROM quota.take_batch_quantity(p_batch_id, p_quantity_to_consume, p_expected_version);
    EXCEPTION WHEN serialization_failure OR no_data_found THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
                                detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
        RAISE SQLSTATE 'PGRST' USING
            MESSAGE = pg_catalog.json_build_object(
                'code', state, 'message', message,
                'details', CASE WHEN detail OPERATOR(pg_catalog.=) '' THEN NULL ELSE detail END,
                'hint', CASE WHEN hint OPERATOR(pg_catalog.=) '' THEN NULL ELSE hint END)::text,
            DETAIL  = pg_catalog.json_build_object(
                'status', CASE WHEN state OPERATOR(pg_catalog.=) '40001' THEN 409 ELSE 404 END,
                'headers', pg_catalog.json_build_object())::text;
    END;
END
$$;

-- Backups. pg_dump writes an extension's tables as the single line CREATE EXTENSION unless
-- they are marked as configuration tables: without the marks a dump and restore (a backup, a
-- move to another server or project) came back with no limits, no usage, no audit trail and no
-- batches. Every table is dumped whole, and so is the audit ids' sequence, so that ids go on
-- after a restore instead of colliding with the restored rows.
--
-- quota.plans and quota.rate_policies start with rows of the install script. A restore runs
-- CREATE EXTENSION, which inserts those again, and then the dumped rows: a dumped row whose key
-- belongs to a shipped row that still holds its shipped values replaces that row instead of
-- failing on the key, so an edited shipped row (a plan's description, the default policy's
-- rates) comes back edited. Any other insert behaves as before.
CREATE FUNCTION quota.replace_shipped_plan()
RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE quota.plans p
       SET description = NEW.description
     WHERE p.plan = NEW.plan
       AND (p.plan, p.description) IN (VALUES
            ('anonymous',  'Callers without a JWT subject'),
            ('free',       'Default plan (quota_ext.default_plan)'),
            ('pro',        'Paid plan'),
            ('enterprise', 'Contract plan'));
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER replace_shipped_row BEFORE INSERT ON quota.plans
    FOR EACH ROW EXECUTE FUNCTION quota.replace_shipped_plan();

CREATE FUNCTION quota.replace_shipped_rate_policy()
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
CREATE TRIGGER replace_shipped_row BEFORE INSERT ON quota.rate_policies
    FOR EACH ROW EXECUTE FUNCTION quota.replace_shipped_rate_policy();

SELECT pg_catalog.pg_extension_config_dump('quota.plans', '');
SELECT pg_catalog.pg_extension_config_dump('quota.limits', '');
SELECT pg_catalog.pg_extension_config_dump('quota.subjects', '');
SELECT pg_catalog.pg_extension_config_dump('quota.overrides', '');
SELECT pg_catalog.pg_extension_config_dump('quota.usage', '');
SELECT pg_catalog.pg_extension_config_dump('quota.usage_stripes', '');
SELECT pg_catalog.pg_extension_config_dump('quota.idempotency_keys', '');
SELECT pg_catalog.pg_extension_config_dump('quota.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('quota.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('quota.rate_policies', '');
SELECT pg_catalog.pg_extension_config_dump('quota.batches', '');
SELECT pg_catalog.pg_extension_config_dump('quota.breakers', '');
SELECT pg_catalog.pg_extension_config_dump('quota.rate_routes', '');
SELECT pg_catalog.pg_extension_config_dump('quota.upstreams', '');

-- Scaling out with Citus (docs/citus.md). What each table becomes on a Citus cluster, in the
-- order the commands must run (a table before the tables whose foreign keys reference it):
-- the configuration as reference tables (a copy on every node), then what grows with traffic
-- distributed by the subject (a batch's owner is a subject), colocated with quota.usage.
CREATE FUNCTION quota.citus_layout()
RETURNS TABLE (step integer, table_name regclass, kind text, distribution_column text, command text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT l.step, l.name::regclass, l.kind, l.col,
           CASE l.kind
               WHEN 'reference' THEN pg_catalog.format('SELECT create_reference_table(%L);', l.name)
               ELSE pg_catalog.format('SELECT create_distributed_table(%L, %L%s);', l.name, l.col,
                   CASE WHEN l.name OPERATOR(pg_catalog.=) 'quota.usage' THEN ''
                        ELSE ', colocate_with => ''quota.usage''' END)
           END
      FROM (VALUES
            (1,  'quota.plans',            'reference',   NULL),
            (2,  'quota.limits',           'reference',   NULL),
            (3,  'quota.subjects',         'reference',   NULL),
            (4,  'quota.overrides',        'reference',   NULL),
            (5,  'quota.rate_policies',    'reference',   NULL),
            (6,  'quota.rate_routes',      'reference',   NULL),
            (7,  'quota.breakers',         'reference',   NULL),
            (8,  'quota.upstreams',        'reference',   NULL),
            (9,  'quota.usage',            'distributed', 'subject'),
            (10, 'quota.usage_stripes',    'distributed', 'subject'),
            (11, 'quota.idempotency_keys', 'distributed', 'subject'),
            (12, 'quota.audit_log',        'distributed', 'subject'),
            (13, 'quota.batches',          'distributed', 'owner')) AS l(step, name, kind, col)
     ORDER BY l.step
$$;

-- Before the Citus commands: Citus refuses a table with triggers as a reference table, so this
-- drops the triggers of the configuration tables (cache invalidation, and the replacement of
-- shipped rows on a restore of a dump). Without them a backend keeps a change it cached for at
-- most quota_ext.cache_ttl, which must be set first (on every node); the administrative
-- functions and quota.invalidate_cache() still apply at once on the node they run on. Only
-- the owner of the tables can run it.
CREATE FUNCTION quota.citus_prepare()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t regclass;
BEGIN
    -- Loads the library first, so that the setting read below is its own, not a placeholder;
    -- the server's value (reset_val: the configuration files, ALTER SYSTEM, ALTER DATABASE
    -- or ROLE) counts, not only a SET of this session.
    PERFORM quota.invalidate_cache();
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_settings AS s
                    WHERE s.name OPERATOR(pg_catalog.=) 'quota_ext.cache_ttl'
                      AND s.vartype OPERATOR(pg_catalog.=) 'integer'
                      AND s.setting::bigint OPERATOR(pg_catalog.>) 0
                      AND s.reset_val::bigint OPERATOR(pg_catalog.>) 0) THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = 'quota_ext.cache_ttl is 0: without the triggers a direct change of the configuration tables would never reach the caches',
            HINT    = 'Set quota_ext.cache_ttl on every node (for instance ALTER SYSTEM SET quota_ext.cache_ttl = ''5s''; SELECT pg_reload_conf();), then call quota.citus_prepare() again.';
    END IF;
    FOR t IN SELECT l.table_name FROM quota.citus_layout() AS l WHERE l.kind OPERATOR(pg_catalog.=) 'reference' LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS limits_cache_invalidation ON %s', t);
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS replace_shipped_row ON %s', t);
    END LOOP;
    PERFORM quota.invalidate_cache();
END
$$;

-- Nothing is callable by PUBLIC; grants below, or by hand (see README) without Supabase roles.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA quota FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA quota FROM PUBLIC;

-- Row level security on every table (Supabase's advisors flag any table in an exposed schema
-- that anon or authenticated can read without it). Authenticated users read their own rows of
-- usage, audit_log and batches, and every plan and limit; nobody but the owner writes (the
-- functions do, as the owner, whom row level security does not restrict). The JWT subject is
-- read once per statement, not per row: each current_setting call stands in a subquery of its
-- own (an initPlan). Only request.jwt.claims counts here: a session-level request.jwt.claim.sub
-- could be left behind on a pooled connection (see README, Security model).
ALTER TABLE quota.plans ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.limits ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.subjects ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.overrides ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.usage_stripes ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.rate_policies ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.batches ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.breakers ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.rate_routes ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.upstreams ENABLE ROW LEVEL SECURITY;

CREATE POLICY plans_readable ON quota.plans FOR SELECT USING (true);
CREATE POLICY limits_readable ON quota.limits FOR SELECT USING (true);
CREATE POLICY usage_own_rows ON quota.usage FOR SELECT
    USING (subject = ANY ((SELECT quota.own_chain())::text[]));
CREATE POLICY usage_stripes_own_rows ON quota.usage_stripes FOR SELECT
    USING (subject = ANY ((SELECT quota.own_chain())::text[]));
-- (An administrative row without a subject has subject '': a JWT whose sub is '' reads none.)
CREATE POLICY audit_own_rows ON quota.audit_log FOR SELECT
    USING (subject = nullif((nullif((SELECT current_setting('request.jwt.claims', true)), '')::jsonb ->> 'sub'), ''));
CREATE POLICY batches_own_rows ON quota.batches FOR SELECT
    USING (owner = (nullif((SELECT current_setting('request.jwt.claims', true)), '')::jsonb ->> 'sub'));

DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT USAGE ON SCHEMA quota TO service_role;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA quota TO service_role;
        GRANT SELECT ON ALL TABLES IN SCHEMA quota TO service_role;
        -- DDL on the tables: their owner's alone.
        REVOKE EXECUTE ON FUNCTION quota.citus_prepare() FROM service_role;
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
            quota.take_batch_quantity(uuid, bigint, bigint),
            quota.consume_item(text, text, bigint, text),
            quota.rate_limit(text, text, bigint),
            quota.pre_request(),
            quota.request_rate_decision(text),
            quota.request_rate_limit(text),
            quota.own_chain()
        TO authenticated;
        GRANT SELECT ON quota.usage, quota.usage_stripes, quota.usage_totals, quota.audit_log, quota.batches, quota.plans, quota.limits TO authenticated;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        GRANT USAGE ON SCHEMA quota TO anon;
        GRANT EXECUTE ON FUNCTION
            quota.rate_limit(text, text, bigint),
            quota.pre_request(),
            quota.request_rate_decision(text),
            quota.request_rate_limit(text)
        TO anon;
    END IF;
END
$grants$;
