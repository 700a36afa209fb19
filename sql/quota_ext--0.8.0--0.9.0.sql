\echo Use "ALTER EXTENSION quota_ext UPDATE TO '0.9.0'" to load this file. \quit

-- 0.8.0 -> 0.9.0: ready for Citus (docs/citus.md). Every key of a table that grows with traffic
-- holds the column a cluster distributes it by; the configuration's caches can do without
-- their triggers (quota_ext.cache_ttl, quota.invalidate_cache(), quota.citus_prepare()).

-- Administrative rows that concern no subject had subject NULL; a key column cannot be NULL.
-- (This rewrites those rows and takes the table's lock for the length of the upgrade.)
UPDATE quota.audit_log SET subject = '' WHERE subject IS NULL;
ALTER TABLE quota.audit_log ALTER COLUMN subject SET NOT NULL;
ALTER TABLE quota.audit_log DROP CONSTRAINT audit_log_pkey,
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (id, subject);
ALTER TABLE quota.batches DROP CONSTRAINT batches_pkey,
    ADD CONSTRAINT batches_pkey PRIMARY KEY (id, owner);

-- (An administrative row without a subject has subject '': a JWT whose sub is '' reads none.)
ALTER POLICY audit_own_rows ON quota.audit_log
    USING (subject = nullif((nullif((SELECT current_setting('request.jwt.claims', true)), '')::jsonb ->> 'sub'), ''));

CREATE FUNCTION quota.invalidate_cache() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'invalidate_cache_wrapper';

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
            (10, 'quota.idempotency_keys', 'distributed', 'subject'),
            (11, 'quota.audit_log',        'distributed', 'subject'),
            (12, 'quota.batches',          'distributed', 'owner')) AS l(step, name, kind, col)
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

REVOKE ALL ON FUNCTION quota.invalidate_cache(), quota.citus_layout(), quota.citus_prepare() FROM PUBLIC;
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT EXECUTE ON FUNCTION quota.invalidate_cache(), quota.citus_layout() TO service_role;
    END IF;
END
$grants$;
