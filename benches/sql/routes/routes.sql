-- 20 routes: 18 that do not match the benchmarked request, one that does (/events%) and a
-- catch-all per address, so each request is matched against every row and spends two buckets.
INSERT INTO quota.rate_policies (policy, plan, rate, per)
SELECT 'route_' || n, 'free', 1000000000, '1 second' FROM generate_series(1, 20) n;
INSERT INTO quota.rate_policies (policy, plan, rate, per) VALUES ('route_20', 'anonymous', 1000000000, '1 second')
    ON CONFLICT DO NOTHING;
INSERT INTO quota.rate_routes (method, path_pattern, policy, key_by, priority)
SELECT CASE WHEN n % 2 = 0 THEN 'GET' ELSE 'POST' END, '/table_' || n || '%', 'route_' || n, 'user', n
  FROM generate_series(1, 18) n;
INSERT INTO quota.rate_routes (method, path_pattern, policy, key_by, priority) VALUES
    ('GET', '/events%', 'route_19', 'user', 19),
    ('*', '%', 'route_20', 'ip', 1000);
