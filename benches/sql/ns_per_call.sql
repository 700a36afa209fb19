-- Cost inside the database: one statement calling rate_check a million times, minus the same
-- statement without the call.
DO $$
DECLARE t0 timestamptz; t1 timestamptz; t2 timestamptz; n bigint;
BEGIN
    t0 := clock_timestamp();
    SELECT count(*) INTO n FROM generate_series(1, 1000000) i WHERE ('ns:' || (i % 10000)) IS NOT NULL;
    t1 := clock_timestamp();
    SELECT count(*) INTO n FROM generate_series(1, 1000000) i
     WHERE (quota.rate_check('ns:' || (i % 10000), 1000000000, '1 second')).allowed;
    t2 := clock_timestamp();
    RAISE NOTICE 'ns_per_call=%', round(extract(epoch FROM (t2 - t1) - (t1 - t0)) * 1e9 / 1000000);
END
$$;
