\set k random(1, 10000)
SELECT plpgsql_rate_check('bench.' || :k, 1000000000, '1 second', 1000000000);
