-- Cost of the rate functions inside the database.
-- Run with psql against a database prepared by benches/sql/setup.sql on a server with
-- quota_ext preloaded (the one benches/run.sh makes is stopped when it ends), e.g.
--   psql -d bench -f benches/sql/rate_in_backend.sql
-- 1. rate_check and rate_limit (policy path), a million calls in one statement each, minus the
--    same statement without the call.
-- 2. the per-statement overhead of a rate_check in a statement run anew each time (as pgbench
--    and PostgREST run them): 200 000 statements from plpgsql, minus the same statements
--    without the call ("fieldsel").
DO $$
DECLARE t0 timestamptz; t1 timestamptz; t2 timestamptz; t3 timestamptz; n bigint;
BEGIN
    t0 := clock_timestamp();
    SELECT count(*) INTO n FROM generate_series(1, 1000000) i WHERE ('ns:' || (i % 10000)) IS NOT NULL;
    t1 := clock_timestamp();
    SELECT count(*) INTO n FROM generate_series(1, 1000000) i
     WHERE (quota.rate_check('ns:' || (i % 10000), 1000000000, '1 second')).allowed;
    t2 := clock_timestamp();
    SELECT count(*) INTO n FROM generate_series(1, 1000000) i
     WHERE (quota.rate_limit('bench', 'user-' || (i % 10000))).allowed;
    t3 := clock_timestamp();
    RAISE NOTICE 'rate_check % ns, rate_limit % ns', round(extract(epoch FROM (t2 - t1) - (t1 - t0)) * 1e9 / 1000000), round(extract(epoch FROM (t3 - t2) - (t1 - t0)) * 1e9 / 1000000);
END
$$;
DO $$
DECLARE t0 timestamptz; t1 timestamptz; t2 timestamptz; t3 timestamptz; r record; k text;
BEGIN
  t0 := clock_timestamp();
  FOR i IN 1..200000 LOOP k := 'bench.' || (i % 10000); SELECT 1 AS a INTO r FROM (SELECT k AS kk) s; END LOOP;
  t1 := clock_timestamp();
  FOR i IN 1..200000 LOOP k := 'bench.' || (i % 10000); SELECT * INTO r FROM (SELECT k AS kk) s, quota.rate_check(s.kk, 1000000000, '1 second'); END LOOP;
  t2 := clock_timestamp();
  FOR i IN 1..200000 LOOP k := 'bench.' || (i % 10000); SELECT (quota.rate_check(s.kk, 1000000000, '1 second')).allowed INTO r FROM (SELECT k AS kk) s; END LOOP;
  t3 := clock_timestamp();
  RAISE NOTICE 'base % ns, from % ns, fieldsel % ns', round(extract(epoch from t1-t0)*1e9/200000), round(extract(epoch from (t2-t1)-(t1-t0))*1e9/200000), round(extract(epoch from (t3-t2)-(t1-t0))*1e9/200000);
END $$;
