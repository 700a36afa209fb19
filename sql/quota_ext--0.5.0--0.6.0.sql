\echo Use "ALTER EXTENSION quota_ext UPDATE TO '0.6.0'" to load this file. \quit

-- 0.5.0 -> 0.6.0: the findings of an attacker's review (see README, Security model).

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
