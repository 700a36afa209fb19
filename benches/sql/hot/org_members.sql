\set k random(1, 10)
SELECT quota.consume('m-1-' || :k, 'api');
