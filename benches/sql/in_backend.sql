-- Cost of each durable call inside one backend (no commit, no client), beside the hand-written
-- SQL doing the same writes.
-- Run with psql against a database prepared by benches/sql/setup.sql on a server with
-- quota_ext preloaded (the one benches/run.sh makes is stopped when it ends), e.g.
--   psql -d bench -f benches/sql/in_backend.sql
-- Everything is rolled back. Figures drift with dead row versions left by earlier runs: compare
-- builds in alternation, several repetitions each.
BEGIN;
DO $$
DECLARE t0 timestamptz; t1 timestamptz; t2 timestamptz; t3 timestamptz; t4 timestamptz; s text; p text; u bigint; b uuid[]; q bigint; v bigint;
BEGIN
  SELECT array_agg(id ORDER BY n) INTO b FROM bench_batches WHERE n >= 1;
  t0 := clock_timestamp();
  FOR i IN 1..20000 LOOP PERFORM quota.consume('user-' || (i % 10000), 'api'); END LOOP;
  t1 := clock_timestamp();
  FOR i IN 1..20000 LOOP
    s := 'user-' || (i % 10000);
    WITH uu AS (
        INSERT INTO quota.usage AS x (subject, metric, period, window_start, used)
        VALUES (s, 'api', 'day', date_trunc('day', now()), 1)
            ON CONFLICT (subject, metric, period, window_start) DO UPDATE
           SET used = x.used + excluded.used
         WHERE x.used <= 1000000000000 - excluded.used
        RETURNING x.period, x.used),
    a AS (
        INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details, idempotency_key)
        SELECT s, 'consume', 'api', 1, true, 'granted',
               ('{"plan": "free", "period": "day", "limit": 1000000000000, "used": ' || uu.used::text || '}')::jsonb, NULL
          FROM uu)
    SELECT period, used INTO p, u FROM uu;
  END LOOP;
  t2 := clock_timestamp();
  FOR i IN 1..5000 LOOP PERFORM quota.consume_batch_quantity(b[1 + i % 1000], 1); END LOOP;
  t3 := clock_timestamp();
  FOR i IN 1..5000 LOOP
    WITH bb AS (
        UPDATE quota.batches AS x SET quantity = x.quantity - 1, version = x.version + 1
         WHERE x.id = b[1 + i % 1000] AND x.quantity >= 1
        RETURNING x.id, x.owner, x.item, x.quantity, x.version),
    a AS (
        INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details)
        SELECT bb.owner, 'consume_batch', bb.item, 1, true, 'consumed',
               ('{"batch_id": "' || bb.id::text || '", "consumed": 1, "remaining": ' || bb.quantity::text
                || ', "version_before": ' || (bb.version - 1)::text || ', "version_after": ' || bb.version::text || '}')::jsonb
          FROM bb)
    SELECT quantity, version INTO q, v FROM bb;
  END LOOP;
  t4 := clock_timestamp();
  RAISE NOTICE 'consume % us, floor % us, batch % us, batch_floor % us', round(extract(epoch from t1-t0)*1e6/20000, 1), round(extract(epoch from t2-t1)*1e6/20000, 1), round(extract(epoch from t3-t2)*1e6/5000, 1), round(extract(epoch from t4-t3)*1e6/5000, 1);
END $$;
DO $$
DECLARE t0 timestamptz; t1 timestamptz;
BEGIN
  t0 := clock_timestamp();
  FOR i IN 1..20000 LOOP PERFORM quota.status('user-' || (i % 10000)); END LOOP;
  t1 := clock_timestamp();
  RAISE NOTICE 'status % us', round(extract(epoch from t1-t0)*1e6/20000, 1);
END $$;
ROLLBACK;
