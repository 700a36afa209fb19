\echo Use "ALTER EXTENSION quota_ext UPDATE TO '0.6.0'" to load this file. \quit

-- 0.5.0 -> 0.6.0: the findings of an attacker's review (see README, Security model).

-- An installation into a schema that another role made first (0.5.0 did not refuse it) is
-- not upgraded: that role could replace what the extension, now switching to its superuser
-- owner, runs.
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
            MESSAGE = pg_catalog.format('schema "quota" belongs to role %I, not to %I, who owns quota_ext',
                                        schema_owner, ext_owner),
            DETAIL  = 'The owner of a schema can drop and replace every object in it, so quota_ext only installs into a schema of its own owner.',
            HINT    = pg_catalog.format('Look at what schema quota holds (its owner may have changed it), then ALTER SCHEMA quota OWNER TO %I and run ALTER EXTENSION quota_ext UPDATE again.',
                                        ext_owner);
    END IF;
END
$squat$;

-- Where a DST change skips midnight, a window ended an hour after the next one started.
CREATE OR REPLACE FUNCTION quota.window_bounds(period text, time_zone text, at_time timestamptz DEFAULT now())
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

-- The role that acted, when it was a trusted one.
ALTER TABLE quota.audit_log ADD COLUMN actor text;

-- Row level security on every table, and policies that read the JWT once per statement (see
-- finalize.sql; Supabase's advisors flagged plans and limits, and the per-row setting reads).
ALTER TABLE quota.plans ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.limits ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.subjects ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.overrides ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE quota.rate_policies ENABLE ROW LEVEL SECURITY;
CREATE POLICY plans_readable ON quota.plans FOR SELECT USING (true);
CREATE POLICY limits_readable ON quota.limits FOR SELECT USING (true);
DROP POLICY usage_own_rows ON quota.usage;
DROP POLICY audit_own_rows ON quota.audit_log;
DROP POLICY batches_own_rows ON quota.batches;
CREATE POLICY usage_own_rows ON quota.usage FOR SELECT
    USING (subject = (nullif((SELECT current_setting('request.jwt.claims', true)), '')::jsonb ->> 'sub'));
CREATE POLICY audit_own_rows ON quota.audit_log FOR SELECT
    USING (subject = (nullif((SELECT current_setting('request.jwt.claims', true)), '')::jsonb ->> 'sub'));
CREATE POLICY batches_own_rows ON quota.batches FOR SELECT
    USING (owner = (nullif((SELECT current_setting('request.jwt.claims', true)), '')::jsonb ->> 'sub'));

-- Functions that read the request settings run in the leader only: a parallel worker gets
-- their values but not whether they were set for the transaction or the session.
ALTER FUNCTION quota.rate_limit(text, text, bigint) PARALLEL RESTRICTED;
ALTER FUNCTION quota.request_rate_decision(text) PARALLEL RESTRICTED;
ALTER FUNCTION quota.status(text) PARALLEL RESTRICTED;
ALTER FUNCTION quota.audit_page(text, bigint, integer) PARALLEL RESTRICTED;
