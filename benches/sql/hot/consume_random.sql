\set s random(1, 10000)
SELECT quota.consume('user-' || :s, 'api');
