\set s random(1, 10000)
SELECT quota.consume('cold-user-' || :s, 'api');
