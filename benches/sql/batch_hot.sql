\set n 0
SELECT * FROM quota.consume_batch_quantity((SELECT id FROM bench_batches WHERE n = :n), 1);
