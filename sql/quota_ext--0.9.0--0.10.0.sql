-- quota_ext 0.9.0 -> 0.10.0: hot windows. A window many callers charge at once is counted in
-- shared memory, and its grants are written to rows of their backends, quota.usage_stripes,
-- instead of all waiting for one usage row (README, Internals).

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

SELECT pg_catalog.pg_extension_config_dump('quota.usage_stripes', '');

-- What each window has used: its usage row plus its stripes (hot windows). Every window with
-- stripes has a usage row. As the caller (security_invoker): row level security of the tables
-- applies.
CREATE VIEW quota.usage_totals WITH (security_invoker = true) AS
SELECT u.subject, u.metric, u.period, u.window_start,
       u.used + coalesce((SELECT sum(st.used) FROM quota.usage_stripes AS st
                           WHERE st.subject = u.subject AND st.metric = u.metric
                             AND st.period = u.period AND st.window_start = u.window_start), 0)::bigint AS used
  FROM quota.usage AS u;


ALTER TABLE quota.usage_stripes ENABLE ROW LEVEL SECURITY;
CREATE POLICY usage_stripes_own_rows ON quota.usage_stripes FOR SELECT
    USING (subject = ANY ((SELECT quota.own_chain())::text[]));
REVOKE ALL ON quota.usage_stripes, quota.usage_totals FROM PUBLIC;

-- The stripes are distributed with the usage rows on a Citus cluster.
CREATE OR REPLACE FUNCTION quota.citus_layout()
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

-- Sessions that were open during the update learn of the new table at their next lock of
-- quota.usage: this rewrites its catalog row (row level security stays on), which invalidates
-- every backend's view of it (src/pg/catalog.rs, Shape), under an AccessExclusiveLock that waits
-- for the transactions charging with the old view.
ALTER TABLE quota.usage ENABLE ROW LEVEL SECURITY;

DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT SELECT ON quota.usage_stripes, quota.usage_totals TO service_role;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        GRANT SELECT ON quota.usage_stripes, quota.usage_totals TO authenticated;
    END IF;
END
$grants$;
