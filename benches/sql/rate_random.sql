\set k random(1, 10000)
SELECT quota.rate_check('bench.' || :k, 1000000000, '1 second');
