\set s random(1, 10)
SELECT quota.consume('cold-hot-' || :s, 'api');
