\set n random(1, 1000)
SELECT * FROM quota.consume_batch_quantity((SELECT id FROM bench_batches WHERE n = :n), 1);
