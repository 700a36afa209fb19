-- near_limit bench: 10 000 subjects and 1 000 organizations with usage in today's window, and
-- a history of old daily windows added by near_history.sql.
CREATE EXTENSION quota_ext;
INSERT INTO quota.plans VALUES ('org', 'organizations');
SELECT quota.set_limit('free', 'api', 'day', 100);
SELECT quota.set_limit('org', 'api', 'day', 1000);
INSERT INTO quota.subjects (subject, plan) SELECT 'org-' || o, 'org' FROM generate_series(1, 1000) o;
INSERT INTO quota.usage (subject, metric, period, window_start, used)
SELECT 'user-' || s, 'api', 'day', date_trunc('day', now(), 'UTC'), (s * 7919) % 101 FROM generate_series(1, 10000) s
UNION ALL
SELECT 'org-' || o, 'api', 'day', date_trunc('day', now(), 'UTC'), (o * 7919) % 1001 FROM generate_series(1, 1000) o;

-- Median wall time in ms of n runs of a query (counted, so every row is produced).
CREATE FUNCTION bench_ms(q text, n int) RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
    ts float8[] := '{}';
    c  bigint;
BEGIN
    FOR i IN 1..n LOOP
        t0 := clock_timestamp();
        EXECUTE 'SELECT count(*) FROM (' || q || ') AS x' INTO c;
        ts := ts || extract(epoch FROM clock_timestamp() - t0)::float8 * 1000;
    END LOOP;
    RETURN (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM unnest(ts) AS x);
END
$$;

-- The queries compared, by name.
CREATE TABLE near_queries (name text PRIMARY KEY, q text NOT NULL);
INSERT INTO near_queries VALUES
('near_limit', $q$SELECT * FROM quota.near_limit(0.8)$q$),
-- What a user writes by hand: usage joined to its limit, keeping the rows of the current
-- window (computed per row, so every row is looked at).
('plain_join', $q$
SELECT u.subject, u.metric, u.period, u.used, l.max_amount
  FROM quota.usage AS u
  LEFT JOIN quota.subjects AS s ON s.subject = u.subject
  JOIN quota.limits AS l ON l.plan = coalesce(s.plan, 'free') AND l.metric = u.metric AND l.period = u.period
 WHERE u.window_start = date_trunc(u.period, now(), 'UTC') AND u.used >= 0.8 * l.max_amount$q$),
-- The same join reading the current windows through the index (UTC only): the floor.
('index_join', $q$
SELECT u.subject, u.metric, u.period, u.used, l.max_amount
  FROM unnest('{minute,hour,day,week,month,year}'::text[]) AS p(period)
  JOIN quota.usage AS u ON u.period = p.period AND u.window_start = date_trunc(p.period, now(), 'UTC')
  LEFT JOIN quota.subjects AS s ON s.subject = u.subject
  JOIN quota.limits AS l ON l.plan = coalesce(s.plan, 'free') AND l.metric = u.metric AND l.period = u.period
 WHERE u.used >= 0.8 * l.max_amount$q$),
-- near_limit's query in 0.7.0: every usage row, window_bounds once per row.
('near_limit_0_7', $q$
SELECT u.subject, u.metric, u.period, u.used, e.max_amount,
       CASE WHEN e.max_amount > 0 THEN u.used::float8 / e.max_amount ELSE 'Infinity'::float8 END AS ratio,
       w.reset_at
  FROM quota.usage AS u
  LEFT JOIN quota.subjects AS s ON s.subject = u.subject
 CROSS JOIN LATERAL (SELECT coalesce(
          (SELECT o.max_amount FROM quota.overrides AS o
            WHERE o.subject = u.subject AND o.metric = u.metric AND o.period = u.period),
          (SELECT l.max_amount FROM quota.limits AS l
            WHERE l.plan = coalesce(s.plan, 'free') AND l.metric = u.metric AND l.period = u.period))
       ) AS e(max_amount)
 CROSS JOIN LATERAL quota.window_bounds(u.period, coalesce(s.time_zone, 'UTC')) AS w
 WHERE u.window_start = w.window_start AND e.max_amount IS NOT NULL AND u.used > 0
   AND u.used >= 0.8 * e.max_amount
 ORDER BY ratio DESC, u.subject, u.metric$q$);
