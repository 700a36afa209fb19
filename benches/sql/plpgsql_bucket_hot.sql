SELECT plpgsql_rate_check('bench.hot', 1000000000, '1 second', 1000000000);
