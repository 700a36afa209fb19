SELECT plpgsql_rate_check('bench.' || (random() * 9999)::int, 1000000000, '1 second', 1000000000);
