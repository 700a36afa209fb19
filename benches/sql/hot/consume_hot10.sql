\set s random(1, 10)
SELECT quota.consume('hot-' || :s, 'api');
