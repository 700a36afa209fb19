\set k random(1, 10000)
-- The floor of the result type: the answer rate_check gives (a quota.rate_decision around the
-- same key), built in SQL with no function behind it.
SELECT ROW(true, 'bench.' || :k, 1000000000::bigint, 999999999::bigint, 0.000000001::float8, 0::float8)::quota.rate_decision;
