\set n 0
UPDATE quota.batches SET quantity = quantity - 1
 WHERE id = (SELECT id FROM bench_batches WHERE n = :n) AND quantity >= 1
RETURNING quantity;
