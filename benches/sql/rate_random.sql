SELECT quota.rate_check('bench.' || (random() * 9999)::int, 1000000000, '1 second');
